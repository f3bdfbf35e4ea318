"""A checkpoint folder that cannot be written is found before training and named for what it is.

The folder is a read-only tmpfs mounted at `run_dir/checkpoints` inside a writable run folder
(as root, where permissions do not stop writes), or a folder without write permission (as any
other user). The pre-flight refuses the run; a save there says "read-only" (or "permission
denied"), never "not enough space".
"""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from test_bad_inputs import refused

from lightning_attn_parallel import checkpoint as ckpt


@pytest.fixture
def locked_folder(tmp_path):
    """(a folder under a writable one that refuses new files, the reason a save must give)."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    if os.geteuid() == 0:  # root writes through permissions: mount a read-only file system
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip("as root, a read-only folder is a read-only tmpfs, and mounting one needs "
                        f"CAP_SYS_ADMIN: {done.stderr.strip() or done.returncode}")
        yield folder, "read-only"
        subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        yield folder, "permission denied"
        folder.chmod(0o755)


def test_preflight_refuses_an_unwritable_checkpoint_folder(locked_folder, tmp_path):
    folder, reason = locked_folder
    message = refused_keeping_run_dir(tmp_path)
    assert "checkpoint folder of run_dir" in message and str(folder) in message, message
    assert reason in message and "not writable" in message, message


def refused_keeping_run_dir(tmp_path) -> str:
    """test_bad_inputs.refused, whose run_dir exists here (it holds the mount)."""
    from lightning_attn_parallel import preflight
    from lightning_attn_parallel.errors import UserError
    from test_bad_inputs import compose_config

    with pytest.raises(UserError) as info:
        preflight.check_run(compose_config([], tmp_path / "run"))
    return str(info.value)


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_save_there_says_why(locked_folder, monkeypatch, kind):
    """Refused before writing; and, with the check skipped, the failing write itself is named by
    its cause."""
    folder, reason = locked_folder
    model = torch.nn.Linear(4, 4)
    path = folder / "last.ckpt"

    def save():
        if kind == "folder":
            ckpt.save_distributed(path, model, None, {"step": 1})
        else:
            ckpt.save_file(path, model.state_dict())

    with pytest.raises(ckpt.CheckpointError) as error:
        save()
    message = str(error.value)
    assert str(path) in message and reason in message and "free" in message, message
    assert "not enough space" not in message and "\n" not in message, message
    monkeypatch.setattr(ckpt, "check_free_space", lambda *args: None)
    with pytest.raises(ckpt.CheckpointError) as error:
        save()
    message = str(error.value)
    assert message.startswith(f"could not write checkpoint {path}") and reason in message, message
