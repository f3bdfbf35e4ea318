"""Checkpoints reshard: saved by tp=2 x dp_shard=2 on 4 ranks, loaded by dp_shard=2 on 2 ranks
and by one process. Parameters equal the saved ones, and one more AdamW step equals the step
the saving run took (so the optimizer state came back too). The consolidated export loads into a
plain model and gives the same logits; bad checkpoints fail with clear errors.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from dist_utils import assert_close, run_distributed
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from lightning_attn_parallel.checkpoint import (
    CheckpointError,
    export_consolidated,
    load_consolidated,
    load_distributed,
    load_lightning_checkpoint,
    read_checkpoint_file,
    save_distributed,
    save_lightning_checkpoint,
)
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.parallel.fully_sharded import apply_fully_sharded
from lightning_attn_parallel.parallel.tensor_parallel import apply_tensor_parallel
from test_tensor_parallel import RTOL, TINY, full_params, make_batch, mean_loss, tiny_model

DTYPE = torch.float64  # parameters after a further AdamW step compared at RTOL[float64]
ROWS = 4  # global batch rows, split over the data-parallel ranks


def step(model, opt, step_index: int, dp_rank: int = 0, dp: int = 1) -> None:
    tokens, targets = make_batch(ROWS, seed=step_index)
    rows = slice(dp_rank * ROWS // dp, (dp_rank + 1) * ROWS // dp)
    mean_loss(model, tokens[rows], targets[rows]).backward()
    opt.step()
    opt.zero_grad()


def adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def fresh_model(**overrides):
    """A model whose weights differ from the saved ones, so a load that does nothing fails."""
    model = tiny_model(DTYPE, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def _save_worker(rank: int, world: int, root: str):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    model = tiny_model(DTYPE)
    apply_fully_sharded(apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True),
                        mesh["dp_shard"])
    opt = adamw(model)
    dp_rank = mesh.get_local_rank("dp_shard")
    step(model, opt, 0, dp_rank, 2)
    save_distributed(f"{root}/ckpt", model, opt, {"step": 1})
    step(model, opt, 1, dp_rank, 2)
    save_distributed(f"{root}/ckpt", model, opt, {"step": 2})  # replaces the first save
    export_consolidated(f"{root}/model.pt", model)
    saved = full_params(model)
    tokens = make_batch(2, seed=7)[0]
    logits = model.output(model(tokens)).full_tensor().detach()  # vocabulary-parallel head
    step(model, opt, 2, dp_rank, 2)
    after = full_params(model)
    return (saved, after, logits) if rank == 0 else None


def _check_loaded(model, opt, extra, saved, after, dp_rank: int, dp: int) -> None:
    assert extra == {"step": 2}, extra
    loaded = full_params(model)
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), f"{name} differs after loading"
    step(model, opt, 2, dp_rank, dp)
    stepped = full_params(model)
    for name, value in after.items():
        assert_close(stepped[name], value, RTOL[DTYPE], name=f"{name} after a further step")


def _load_worker(rank: int, world: int, root: str, saved, after) -> None:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    model = apply_fully_sharded(fresh_model(), mesh)
    opt = adamw(model)
    extra = load_distributed(f"{root}/ckpt", model, opt)
    _check_loaded(model, opt, extra, saved, after, rank, 2)
    exported = apply_fully_sharded(fresh_model(), mesh)
    load_consolidated(f"{root}/model.pt", exported)
    for name, value in full_params(exported).items():  # the export is fp32
        assert_close(value, saved[name], RTOL[torch.float32], name=f"consolidated {name}")


def test_checkpoint_reshards_across_plans(tmp_path):
    saved, after, logits = run_distributed(_save_worker, 4, str(tmp_path))[0]
    assert not (tmp_path / "ckpt.tmp").exists() and not (tmp_path / "ckpt.old").exists()
    run_distributed(_load_worker, 2, str(tmp_path), saved, after)

    model = fresh_model()  # one process, no process group
    opt = adamw(model)
    extra = load_distributed(tmp_path / "ckpt", model, opt)
    _check_loaded(model, opt, extra, saved, after, 0, 1)

    plain = build_model(ModelConfig(**TINY))  # the consolidated file needs nothing of the plugin
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert_close(plain.output(plain(make_batch(2, seed=7)[0])), logits, RTOL[torch.float32],
                 name="logits of the consolidated model")
    _check_errors(tmp_path)


def _check_errors(root) -> None:
    model = fresh_model()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_distributed(root / "missing", model)
    with pytest.raises(CheckpointError, match=r"'blocks.0.ffn.w1.weight' has shape \[64, 32\] there "
                                              r"but \[96, 32\].*saved with"):
        load_distributed(root / "ckpt", fresh_model(ffn_dim=96))
    with pytest.raises(CheckpointError, match="no parameter 'blocks.2"):
        load_distributed(root / "ckpt", fresh_model(n_layers=3))
    with pytest.raises(CheckpointError, match="holds 1 optimizer"):
        load_distributed(root / "ckpt", model, [adamw(model), adamw(model)])
    with pytest.raises(CheckpointError, match=r"'tok_embeddings.weight' has shape \[64, 32\]"):
        load_consolidated(root / "model.pt", fresh_model(vocab_size=128))

    broken = root / "broken"
    shutil.copytree(root / "ckpt", broken)
    next(broken.glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_distributed(broken, model)
    (broken / ".metadata").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable metadata"):
        load_distributed(broken, model)
    (broken / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="not a complete distributed checkpoint"):
        load_distributed(broken, model)
    (root / "garbage.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_consolidated(root / "garbage.pt", model)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    model = tiny_model()
    path = tmp_path / "ckpt"
    save_distributed(path, model, None, {"step": 1})
    (tmp_path / "ckpt.tmp").mkdir()  # what a save killed half-way leaves behind
    (tmp_path / "ckpt.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert load_distributed(path, tiny_model()) == {"step": 1}
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    save_distributed(path, model, None, {"step": 2})
    restored = tiny_model()
    assert load_distributed(path, restored) == {"step": 2}
    assert torch.equal(restored.norm.weight, model.norm.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_lightning_checkpoint_dict_round_trip(tmp_path):
    """The strategy's format: Lightning's dict with sharded state dicts in it, same folder layout."""
    model = tiny_model()
    opt = adamw(model)
    step(model, opt, 0)
    checkpoint = {"state_dict": get_model_state_dict(model),
                  "optimizer_states": [get_optimizer_state_dict(model, opt)],
                  "epoch": 3, "loops": {"fit_loop": {"batches": 7}}}
    save_lightning_checkpoint(tmp_path / "last", checkpoint, is_rank_zero=True)
    restored = fresh_model().float()
    restored_opt = adamw(restored)
    rest = load_lightning_checkpoint(tmp_path / "last", restored, [restored_opt])
    assert rest == {"epoch": 3, "loops": {"fit_loop": {"batches": 7}}}
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p, q), name
    assert restored_opt.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_file(tmp_path / "missing.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint_file(tmp_path / "bad.ckpt")
