import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch


@pytest.fixture(autouse=True)
def float32_after_each_test():
    """Tests that train in fp64 switch torch's default dtype; every test after them starts from
    torch's own."""
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def one_thread():
    """Tiny matmuls: threads only add contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def uninterrupted_two_rank_run(tmp_path_factory) -> list:
    """tests/fault_worker.py's run to the end on two gloo ranks (the reference of the fault,
    preemption and kill tests), once per session: [result of rank 0, of rank 1]."""
    from test_faults import finish, launch, results
    from test_resume import data_module

    root = tmp_path_factory.mktemp("uninterrupted")
    data_module(str(root / "cache")).prepare_data()
    for code, err in finish(launch("none", root / "run")):
        assert code == 0, err[-3000:]
    return results(root / "run")
