"""Faults on two gloo ranks: a frozen rank (SIGSTOP) or a killed one (SIGKILL) after the
checkpoint of step STOP_STEP.

The surviving rank must exit within strategy.timeout_s (plus a margin for a loaded machine)
with one line that names the lost rank and the operation it was waiting in; the last checkpoint
must then load, and the resumed run must equal the uninterrupted one (tests/test_resume.py's
run, through tests/fault_worker.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import assert_close, free_port
from test_resume import FINAL_STEP, STOP_STEP, data_module

TIMEOUT_S = 3.0
MARGIN_S = 8.0  # start-up of the heartbeat's diagnosis and process exit on a busy CI machine
WORKER = Path(__file__).with_name("fault_worker.py")


def launch(mode: str, root: Path, ckpt: str | None = None, fault_rank: int = 1) -> list[subprocess.Popen]:
    """Both ranks as separate processes (so one can be stopped or killed on its own)."""
    root.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), NODE_RANK="0", FAULT_RANK=str(fault_rank))
        args = [sys.executable, str(WORKER), mode, str(root), str(TIMEOUT_S)] + ([ckpt] if ckpt else [])
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        out.append((proc.returncode, err))
    return out


def results(root: Path) -> list[dict]:
    return [torch.load(root / f"result-rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("faults")
    data_module(str(base / "cache")).prepare_data()  # the corpus once, before any rank starts
    return base


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_two_rank_run) -> list[dict]:
    return uninterrupted_two_rank_run


@pytest.mark.parametrize("fault,lost", [("stop", 1), ("kill", 1), ("stop", 0)])
def test_lost_rank_is_named_and_the_run_resumes(base, uninterrupted, fault, lost):
    """Rank 0 also serves the rendezvous store: frozen, it takes the store down with it."""
    root = base / f"{fault}{lost}"
    procs = launch(fault, root, fault_rank=lost)
    survivor, victim = procs[1 - lost], procs[lost]
    try:
        _, err = survivor.communicate(timeout=240)
        ended = time.time()
    finally:
        if victim.poll() is None:  # the stopped rank: end it
            victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    waited = ended - float((root / "fault_time").read_text())
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert survivor.returncode == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: PeerFailure: rank {lost} "), lines[0]
    assert "gradient_reducer.py" in lines[0], lines[0]  # the operation it waited in
    assert "Traceback" not in err
    assert waited < TIMEOUT_S + MARGIN_S, f"rank {1 - lost} exited {waited:.1f} s after rank {lost} was lost"
    if lost == 0:
        return  # resuming is shown by the other two

    # The last checkpoint (step STOP_STEP) loads, and the resumed run equals the uninterrupted one.
    resumed_root = base / f"{fault}-resumed"
    for code, err in finish(launch("none", resumed_root, ckpt=str(root / "last.ckpt"))):
        assert code == 0, err[-3000:]
    for rank, (resumed, full) in enumerate(zip(results(resumed_root), uninterrupted)):
        assert resumed["global_step"] == FINAL_STEP
        assert len(resumed["losses"]) == FINAL_STEP - STOP_STEP
        assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][STOP_STEP:]), rtol=1e-6,
                     name=f"{fault} rank{rank} losses")
        for key, value in full["params"].items():
            assert_close(resumed["params"][key], value, rtol=1e-6, name=f"{fault} rank{rank} {key}")


# ---------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: checkpoints of a 1 MiB model fill it after two saves."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a full disk is simulated with a small tmpfs, and mounting one needs root "
                    f"(CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))  # 1 MiB
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    return model, optimizer


def _fill(disk: Path, leave: int) -> None:
    """Take all the free space of `disk` but `leave` bytes."""
    import shutil

    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def _leftovers(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if p.name.endswith((".tmp", ".old")))


@pytest.mark.parametrize("fill", ["before", "during"])
def test_full_disk_keeps_the_previous_folder_checkpoint(small_disk, monkeypatch, fill):
    """A sharded (DCP folder) save onto a disk without room: refused up front when the room is
    known to be short, or failing half-way when the disk fills while writing; either way one
    clear error naming the path, nothing partial left, and the previous checkpoint loads."""
    from lightning_attn_parallel import checkpoint as ckpt

    model, optimizer = _model_and_optimizer()
    path = small_disk / "last"
    ckpt.save_distributed(path, model, optimizer, {"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    _fill(small_disk, leave=512 * 1024)  # room for half of a save
    if fill == "during":  # the check passes, then the writes hit ENOSPC
        monkeypatch.setattr(ckpt, "check_free_space", lambda *args: None)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.save_distributed(path, model, optimizer, {"step": 2})
    message = str(error.value)
    assert str(path) in message and "free" in message and "\n" not in message, message
    if fill == "before":
        assert message.startswith(f"not enough space to save checkpoint {path}: it needs about"), message
    else:
        assert message.startswith(f"could not write checkpoint {path}"), message
    assert _leftovers(small_disk) == []
    restored, restored_opt = _model_and_optimizer()
    assert ckpt.load_distributed(path, restored, restored_opt) == {"step": 1}
    for key, value in restored.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("fill", ["before", "during"])
def test_full_disk_keeps_the_previous_file_checkpoint(small_disk, monkeypatch, fill):
    """The single-file path (replicated plans, consolidated exports): same guarantees; without
    them torch.save says only "iostream error" and leaves a .tmp that keeps the disk full."""
    from lightning_attn_parallel import checkpoint as ckpt

    model, _ = _model_and_optimizer()
    path = small_disk / "model.pt"
    ckpt.export_consolidated(path, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    _fill(small_disk, leave=512 * 1024)
    if fill == "during":
        monkeypatch.setattr(ckpt, "check_free_space", lambda *args: None)
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {path}.*free") as error:
        ckpt.export_consolidated(path, model)
    assert "\n" not in str(error.value)
    assert _leftovers(small_disk) == []
    restored, _ = _model_and_optimizer()
    ckpt.load_consolidated(path, restored)


def _save_on_full_disk(rank: int, world: int, disk: str) -> list[str]:
    """Each save fails (on the writer only, for the file); every rank must raise, none hang."""
    from lightning_attn_parallel import checkpoint as ckpt

    model, optimizer = _model_and_optimizer()
    messages = []
    for save in (lambda: ckpt.save_file(f"{disk}/state.pt", model.state_dict()),
                 lambda: ckpt.save_distributed(f"{disk}/last", model, optimizer, {"step": 2})):
        try:
            save()
        except ckpt.CheckpointError as error:
            messages.append(str(error))
    return messages


def test_full_disk_error_reaches_every_rank(small_disk):
    from dist_utils import run_distributed

    _fill(small_disk, leave=512 * 1024)
    first, second = run_distributed(_save_on_full_disk, 2, str(small_disk), timeout=120)
    assert len(first) == 2 and first == second, (first, second)
    assert all("not enough space to save checkpoint" in m for m in first)
    assert _leftovers(small_disk) == []
