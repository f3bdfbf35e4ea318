"""Checkpoints under expert parallelism hold every expert and reshard to any other layout.

Under ep > 1 each rank keeps a block of the routed experts under the full tensor's name, so the
checkpoint must describe the experts with their global shapes. One spawn of 4 gloo processes
trains the tiny MoE model (float64) through `Trainer(strategy=AttnHybridStrategy)` for 2 steps
and saves with `trainer.save_checkpoint`:
- ep=4 with replicated attention: a checkpoint folder, and `export_consolidated`;
- FSDP2 x ep (dp_shard=2, so HSDP over 2 replicas, with ep=2; FSDP2 also shards each rank's
  experts over edp=2): a folder, and a single file of full state dicts
  (save_distributed_checkpoint=False).
The same 4 ranks resume the ep=4 folder under FSDP2 x ep. Then ranks 2 and 3 leave, ranks 0 and 1
form a new 2-process world and resume: the ep=4 folder under ep=2, the FSDP2 x ep folder under
plain FSDP2 (no expert parallelism), its single file under ep=2, and a one-process run's file
(torch's numbered optimizer states) under ep=2. One plain process (no process group, no strategy)
loads the ep=4 folder and the exported file.

Every resumed run starts from exactly the saved parameters and continues with the losses and
final parameters of an uninterrupted one-process run, so the experts' AdamW states (exp_avg,
exp_avg_sq) came back to the right ranks: with them lost or misplaced the first resumed step
moves the experts by about the learning rate. Every checkpoint sits on an epoch boundary, as in
test_sharded_training.py (FixedTokens' loader cannot skip part of an epoch).
"""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist

from dist_utils import assert_close, free_port, run_distributed
from lightning_utils import FixedTokens, LossRecorder, loader, params_of, quiet_trainer
from test_expert_parallel_training import MOE, PRECISION

import lightning_attn_parallel as lap
from lightning_attn_parallel.checkpoint import (
    export_consolidated,
    load_consolidated,
    load_distributed,
    save_distributed,
)
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.lightning_workarounds import settle_fit_loop_state

EP4 = dict(ep=4)
FSDP_EP = dict(dp_shard=2, ep=2)
EP2 = dict(ep=2)
FSDP2 = dict(dp_shard=2)
GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 2
SAVE_STEP, FINAL_STEP = 2, 4
WORLD, RESUME_WORLD = 4, 2
OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq")


def is_expert(name: str) -> bool:
    return ".experts." in name


def make_module(seed: int = 0) -> lap.CausalLMModule:
    L.seed_everything(seed, verbose=False)
    module = lap.CausalLMModule(ModelConfig(**MOE), lr=1e-2, warmup_steps=1, total_steps=FINAL_STEP)
    module.configure_model()
    return module


def probe_tokens() -> torch.Tensor:
    return torch.randint(MOE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(7))


def ep_block(module: L.LightningModule, name: str, full: torch.Tensor) -> torch.Tensor:
    """The block of `full` (the whole tensor of parameter `name`, or of a state shaped like it)
    that this rank holds over ep: experts are DTensors sharded on dim 0 over the mesh dim "ep"."""
    param = dict(module.named_parameters()).get(name)
    names = getattr(getattr(param, "device_mesh", None), "mesh_dim_names", None) or ()
    if "ep" not in names or not is_expert(name):
        return full
    dim = names.index("ep")
    ep, ep_rank = param.device_mesh.size(dim), param.device_mesh.get_local_rank(dim)
    per_rank = full.shape[0] // ep
    return full[ep_rank * per_rank:(ep_rank + 1) * per_rank]


def held_params(module: L.LightningModule, params: dict) -> dict:
    """`params` (whole tensors by name) cut to what this rank holds: its block of the experts."""
    return {name: ep_block(module, name, value) for name, value in params.items()}


def expert_optimizer_states(module: L.LightningModule, optimizer) -> dict:
    """This rank's AdamW states of the experts (FSDP2's edp shards gathered to the ep block)."""
    by_param = {p: name for name, p in module.named_parameters()}
    states = {}
    for param, state in optimizer.state.items():
        if is_expert(by_param[param]):
            name = by_param[param]
            states[name] = {k: ep_block(module, name, v.full_tensor() if hasattr(v, "full_tensor") else v)
                            .detach().clone() for k, v in state.items() if k in OPTIMIZER_STATES}
    return states


def fit(plan_kwargs, world: int, rank: int, max_steps: int, ckpt_path=None):
    """Train (plan None: Lightning's single-device strategy) and return (result, trainer, module)."""
    module = make_module()
    recorder = LossRecorder(average_over_ranks=True)
    strategy = "auto" if plan_kwargs is None else lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs))
    trainer = quiet_trainer(strategy=strategy, devices=world, max_steps=max_steps, precision=PRECISION,
                            limit_train_batches=STEPS_PER_EPOCH, callbacks=[recorder])
    trainer.fit(module, loader(FixedTokens(), GLOBAL_BATCH // world, replicas=world, rank=rank),
                ckpt_path=ckpt_path)
    result = {"losses": recorder.losses, "start_params": held_params(module, recorder.start_params),
              "params": held_params(module, params_of(module)), "global_step": trainer.global_step,
              "optimizer": expert_optimizer_states(module, trainer.optimizers[0])}
    return result, trainer, module


# --------------------------------------------------------------------------- distributed runs
def _worker(rank: int, world: int, root: str, resume_port: int) -> dict:
    out = {}
    out["ep4"], trainer, module = fit(EP4, world, rank, SAVE_STEP)
    trainer.save_checkpoint(f"{root}/ep4")
    export_consolidated(f"{root}/ep4.pt", module.model)
    with torch.no_grad():
        module.model.eval()
        out["ep4_logits"] = module.model.output(module.model(probe_tokens()))

    out["fsdp_ep"], trainer, _ = fit(FSDP_EP, world, rank, SAVE_STEP)
    trainer.save_checkpoint(f"{root}/fsdp_ep")
    trainer.strategy._save_distributed_checkpoint = False  # as AttnHybridStrategy(save_distributed_checkpoint=False)
    trainer.save_checkpoint(f"{root}/fsdp_ep.ckpt")

    out["ep4_to_fsdp_ep"] = fit(FSDP_EP, world, rank, FINAL_STEP, ckpt_path=f"{root}/ep4")[0]

    # A fresh, smaller world on the same processes, as after a restart on fewer ranks.
    dist.barrier()
    dist.destroy_process_group()
    if rank < RESUME_WORLD:
        os.environ.update(MASTER_PORT=str(resume_port), WORLD_SIZE=str(RESUME_WORLD))
        dist.init_process_group("gloo", rank=rank, world_size=RESUME_WORLD)
        out.update(resume(RESUME_WORLD, rank, root))
    return out


def resume(world: int, rank: int, root: str) -> dict:
    out = {}
    out["ep4_to_ep2"], trainer, module = fit(EP2, world, rank, FINAL_STEP, ckpt_path=f"{root}/ep4")
    save_distributed(f"{root}/ep2_final", module, trainer.optimizers)
    load_consolidated(f"{root}/ep4.pt", module.model)  # the ep=4 export, into this rank's block
    out["ep2_consolidated"] = held_params(module, params_of(module))
    out["fsdp_ep_to_fsdp2"] = fit(FSDP2, world, rank, FINAL_STEP, ckpt_path=f"{root}/fsdp_ep")[0]
    out["fsdp_ep_file_to_ep2"] = fit(EP2, world, rank, FINAL_STEP, ckpt_path=f"{root}/fsdp_ep.ckpt")[0]
    out["plain_file_to_ep2"] = fit(EP2, world, rank, FINAL_STEP, ckpt_path=f"{root}/plain.ckpt")[0]
    return out


def assemble(per_rank: list[dict], ep: int) -> dict:
    """Full tensors from per-rank dicts of tensors: rank i < ep holds expert block i (ep is the
    innermost rank dimension of the expert mesh); everything else is the same on every rank."""
    return {name: torch.cat([d[name] for d in per_rank[:ep]]) if is_expert(name) else value
            for name, value in per_rank[0].items()}


def flat_states(states: dict) -> dict:
    """{parameter: {exp_avg: t, ...}} as {"parameter:exp_avg": t, ...}."""
    return {f"{name}:{key}": t for name, per_param in states.items() for key, t in per_param.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("expert_ckpt")


@pytest.fixture(scope="module")
def runs(root):
    plain, trainer, _ = fit(None, 1, 0, SAVE_STEP)
    trainer.save_checkpoint(root / "plain.ckpt")
    # Lightning's own strategy records a finished fit's loop state ambiguously (see
    # settle_fit_loop_state); record it as AttnHybridStrategy.save_checkpoint would.
    checkpoint = torch.load(root / "plain.ckpt", weights_only=False)
    torch.save(settle_fit_loop_state(checkpoint), root / "plain.ckpt")
    results = run_distributed(_worker, WORLD, str(root), free_port())
    uninterrupted = fit(None, 1, 0, FINAL_STEP)[0]
    return {"results": results, "uninterrupted": uninterrupted, "plain": plain}


# --------------------------------------------------------------------------- tests
SAVED_EP = {"ep4": 4, "fsdp_ep": 2, "plain": 1}
RESUMED = {  # resumed run: (its layout's ep, the saving run, world it ran on)
    "ep4_to_fsdp_ep": (2, "ep4", WORLD),
    "ep4_to_ep2": (2, "ep4", RESUME_WORLD),
    "fsdp_ep_to_fsdp2": (1, "fsdp_ep", RESUME_WORLD),
    "fsdp_ep_file_to_ep2": (2, "fsdp_ep", RESUME_WORLD),
    "plain_file_to_ep2": (2, "plain", RESUME_WORLD),
}


def saved_params(runs: dict, saved: str) -> dict:
    if saved == "plain":
        return runs["plain"]["params"]
    return assemble([r[saved]["params"] for r in runs["results"]], SAVED_EP[saved])


def test_saving_runs_hold_different_experts_on_each_rank(runs):
    """The premise: EP ranks hold different blocks, so a checkpoint keeping one rank's block in
    place of the others cannot pass the tests below; and the saving runs trained the same model
    as the uninterrupted one."""
    results = runs["results"]
    name = next(n for n in results[0]["ep4"]["params"] if is_expert(n))
    blocks = [results[r]["ep4"]["params"][name] for r in range(WORLD)]
    assert blocks[0].shape[0] == MOE["n_routed_experts"] // 4
    assert all(not torch.equal(blocks[0], b) for b in blocks[1:])
    for saved in ("ep4", "fsdp_ep"):
        assert results[0][saved]["global_step"] == SAVE_STEP
        expected = torch.tensor(runs["uninterrupted"]["losses"][:SAVE_STEP])
        assert_close(torch.tensor(results[0][saved]["losses"]), expected, name=f"{saved} losses")
        full = saved_params(runs, saved)
        for key, value in runs["plain"]["params"].items():
            assert_close(full[key], value, name=f"{saved} {key} at the save")


@pytest.mark.parametrize("name", list(RESUMED))
def test_expert_parallel_checkpoint_resumes_under_another_layout(runs, name):
    """Starts from exactly the saved parameters (every expert in its place), then continues with
    the uninterrupted run's losses to its final parameters and optimizer states: the experts'
    exp_avg and exp_avg_sq came back to the ranks that now hold those experts."""
    ep, saved, world = RESUMED[name]
    runs_of = [r[name] for r in runs["results"][:world]]
    assert runs_of[0]["global_step"] == FINAL_STEP
    start = assemble([r["start_params"] for r in runs_of], ep)
    for key, value in saved_params(runs, saved).items():
        assert torch.equal(start[key], value), f"{name}: {key} not restored"
    full = runs["uninterrupted"]
    expected = torch.tensor(full["losses"][SAVE_STEP:FINAL_STEP])
    assert_close(torch.tensor(runs_of[0]["losses"]), expected, name=f"{name} losses")
    params = assemble([r["params"] for r in runs_of], ep)
    for key, value in full["params"].items():
        assert_close(params[key], value, name=f"{name} final {key}")
    states = assemble([flat_states(r["optimizer"]) for r in runs_of], ep)
    assert set(states) == set(flat_states(full["optimizer"]))
    for key, value in flat_states(full["optimizer"]).items():
        assert_close(states[key], value, name=f"{name} final {key}")


def test_one_process_loads_every_expert_and_its_optimizer_state(runs, root):
    """The ep=4 folder into a plain model and optimizer in one process (no process group): each
    expert block is the block of the rank that held it, and so are exp_avg and exp_avg_sq."""
    results = runs["results"]
    module = make_module(seed=1).double()
    module.trainer = quiet_trainer(devices=1, precision=PRECISION)  # configure_optimizers reads it
    optimizer = module.configure_optimizers()["optimizer"]
    extra = load_distributed(root / "ep4", module, optimizer)
    assert extra["global_step"] == SAVE_STEP
    loaded_params = params_of(module)
    for key, value in saved_params(runs, "ep4").items():
        assert torch.equal(loaded_params[key], value), f"{key} differs after loading"
    loaded = flat_states(expert_optimizer_states(module, optimizer))
    saved = assemble([flat_states(r["ep4"]["optimizer"]) for r in results], 4)
    assert loaded and set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), f"{key} differs after loading"

    # save_distributed by the ep=2 run after its resume: its final model, in one process.
    final = make_module(seed=1).double()
    load_distributed(root / "ep2_final", final)
    final_params = params_of(final)
    for key, value in runs["uninterrupted"]["params"].items():
        assert_close(final_params[key], value, name=f"save_distributed under ep=2: {key}")


def test_consolidated_export_holds_every_expert(runs, root):
    """export_consolidated under ep=4 loads into the plain model (no plugin) with the distributed
    model's logits, and load_consolidated puts it back into an ep=2 model's blocks."""
    results = runs["results"]
    saved = saved_params(runs, "ep4")
    exported = torch.load(root / "ep4.pt", weights_only=True)
    for key, value in saved.items():
        assert torch.equal(exported[key[len("model."):]], value.float()), key
    plain = build_model(ModelConfig(**MOE)).double()
    plain.load_state_dict(exported)
    plain.eval()
    with torch.no_grad():
        logits = plain.output(plain(probe_tokens()))
    assert_close(logits, results[0]["ep4_logits"], name="logits of the consolidated model")
    reloaded = assemble([r["ep2_consolidated"] for r in results[:RESUME_WORLD]], 2)
    for key, value in saved.items():
        assert torch.equal(reloaded[key], value.float().double()), f"load_consolidated: {key}"
