"""Pipeline parallelism with DeepSeek-style mixture-of-experts models, and with expert
parallelism inside each stage, equals one process on the same global batch.

One spawn of 4 gloo processes trains (fp64, gradient clipping on, 3 steps) a 4-block MoE model
(block 0 dense, blocks 1-3 MoE; stages [0, 1] and [2, 3], so both stages hold MoE layers) with
the sequence-wise balance loss and the auxiliary-loss-free bias update on:
- pp=2 x dp=2 under 1F1B with 2 batches accumulated per step;
- pp=2 x ep=2 (each stage's 2 ranks split its experts) under GPipe with 4 micro-batches;
then pp=2 x ep=2 saves a checkpoint folder at step 2 and replicated data parallelism with ep=2
over the 4 ranks (pp=1) resumes it to step 4. The balance loss arises on both stages and joins
each micro-batch's backward there (AuxLossBackward); every stage updates its own routers'
biases. Weights, router biases, the loss each rank differentiates (token + balance loss) and the
logged token loss are compared with one process (relative error below 1e-10). The load-balance
callback's expert loads, gathered over the ranks, cover both stages' MoE layers.

Each part fails when broken: without the balance loss in the stages' backward, with its scale
missing the accumulated batches (the 1F1B case), or with the last stage skipping its bias
update, weights differ from one process by 3e-2 to 8e-2.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist

from dist_utils import assert_close, run_distributed
from lightning_utils import FixedTokens, LossRecorder, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.callbacks import LoadBalanceCallback
from lightning_attn_parallel.models import ModelConfig

MOE = dict(family="deepseek", attention="mla", vocab_size=64, d_model=32, n_layers=4, n_heads=4,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, ffn_dim=64,
           max_seq_len=32, n_routed_experts=8, n_shared_experts=1, moe_top_k=2, moe_ffn_dim=16,
           first_k_dense_replace=1, aux_loss_coef=0.05, score_func="sigmoid", norm_topk_prob=True,
           bias_update_speed=0.01)
WORLD, DP = 4, 2
GLOBAL_BATCH = 8
STEPS = 3
CLIP = 0.05  # below the gradient norm: every step clips by the norm over both stages' experts
STAGES = [2, 2]
CASES = {
    # name: (plan kwargs, accumulate_grad_batches)
    "1f1b_pp2_dp2_accumulate": (dict(pp=2, pp_schedule="1f1b", pp_microbatches=2), 2),
    "gpipe_pp2_ep2": (dict(pp=2, ep=2, pp_schedule="gpipe", pp_microbatches=4), 1),
}
SAVE_PLAN, LOAD_PLAN = dict(pp=2, ep=2, pp_microbatches=2), dict(ep=2)
STEPS_PER_EPOCH, SAVE_STEP, FINAL_STEP = 2, 2, 4



class LoggedLoss(L.Callback):
    """The logged `train/loss` of every batch, averaged over the ranks."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        loss = trainer.callback_metrics["train/loss"].detach().double().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(float(loss))


def state_of(module) -> dict[str, torch.Tensor]:
    """Parameters (experts gathered) and the routers' selection biases."""
    out = params_of(module)
    out.update({name: b.detach().cpu().clone() for name, b in module.named_buffers() if name.endswith("expert_bias")})
    return out


def fit(plan_kwargs: dict, world: int, rank: int, max_steps: int, accumulate: int = 1, ckpt_path=None,
        save_path=None, limit=None) -> dict:
    L.seed_everything(0, verbose=False)
    torch.set_default_dtype(torch.float64)
    module = lap.CausalLMModule(ModelConfig(**MOE), lr=1e-2, warmup_steps=1, total_steps=FINAL_STEP)
    module.configure_model()
    recorder, logged, balance = LossRecorder(average_over_ranks=True), LoggedLoss(), LoadBalanceCallback(1)
    strategy = lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs)) if world > 1 else "auto"
    trainer = quiet_trainer(strategy=strategy, devices=world, max_steps=max_steps,
                            accumulate_grad_batches=accumulate, gradient_clip_val=CLIP,
                            callbacks=[recorder, logged, balance], limit_train_batches=limit)
    pp = plan_kwargs.get("pp", 1)
    dp = world // pp
    rows = GLOBAL_BATCH // DP // accumulate
    trainer.fit(module, loader(FixedTokens(), rows * DP // dp, replicas=dp, rank=rank % dp), ckpt_path=ckpt_path)
    if save_path is not None:
        trainer.save_checkpoint(save_path)
    return {"losses": recorder.losses, "logged": logged.losses, "state": state_of(module),
            "start": recorder.start_params, "balance": balance.history[-1][1] if balance.history else {}}


def _worker(rank: int, world: int, root: str) -> dict:
    results = {name: fit({**plan, "pp_layers_per_stage": STAGES}, world, rank, STEPS, accumulate)
               for name, (plan, accumulate) in CASES.items()}
    results["saved"] = fit(SAVE_PLAN, world, rank, SAVE_STEP, limit=STEPS_PER_EPOCH, save_path=f"{root}/pp2_ep2")
    results["resumed"] = fit(LOAD_PLAN, world, rank, FINAL_STEP, limit=STEPS_PER_EPOCH,
                             ckpt_path=f"{root}/pp2_ep2")
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, WORLD, str(tmp_path_factory.mktemp("pipeline_moe")), timeout=400)


def one_process(max_steps: int, accumulate: int = 1, limit=None) -> dict:
    return fit({}, 1, 0, max_steps, accumulate, limit=limit)


@pytest.mark.parametrize("name", list(CASES))
def test_pipelined_moe_equals_one_process(results, name):
    plan, accumulate = CASES[name]
    reference = one_process(STEPS, accumulate)
    assert any(float(b.abs().max()) > 0 for k, b in reference["state"].items() if k.endswith("expert_bias"))
    stages = {}
    for rank, result in enumerate(results):
        got = result[name]
        assert got["state"] and set(got["state"]) < set(reference["state"]), name
        for key, value in got["state"].items():
            assert_close(value, reference["state"][key], rtol=1e-10, name=f"{name} rank{rank} {key}")
        # differentiated: token + balance loss; logged: the token loss alone, as one process logs it
        assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]), rtol=1e-10,
                     name=f"{name} loss")
        assert_close(torch.tensor(got["logged"]), torch.tensor(reference["logged"]), rtol=1e-10,
                     name=f"{name} logged loss")
        stages.setdefault(frozenset(got["state"]), rank)
    assert len(stages) == 2 and set().union(*stages) == set(reference["state"]), \
        "the two stages together hold the whole model, and each holds MoE layers"
    for keys in stages:
        assert any(k.endswith("expert_bias") for k in keys)
    # every rank logs the expert loads of all MoE layers, whichever stage holds them
    for result in results:
        loads = {k: v for k, v in result[name]["balance"].items() if "/moe/" in k and k.endswith("imbalance")}
        assert sorted(loads) == sorted(k for k in reference["balance"] if "/moe/" in k and k.endswith("imbalance"))
        assert len(loads) == 3 and all(v >= 1.0 for v in loads.values()), loads


def test_checkpoint_saved_under_pp_and_ep_resumes_without_pipelining(results):
    """pp=2 x ep=2 saves at step 2 (each stage its blocks, each ep rank its experts); ep=2 without
    pipelining on the same ranks loads it and continues with the uninterrupted single-process
    run's losses and weights, experts and router biases included."""
    reference = one_process(FINAL_STEP, limit=STEPS_PER_EPOCH)
    saved = {k: v for result in results for k, v in result["saved"]["state"].items()}
    assert set(saved) == set(reference["state"])
    for result in results:
        for key, value in result["resumed"]["start"].items():
            assert_close(value, saved[key], rtol=1e-12, name=f"loaded {key}")
        assert_close(torch.tensor(result["saved"]["losses"]), torch.tensor(reference["losses"][:SAVE_STEP]),
                     rtol=1e-10, name="saved losses")
        assert_close(torch.tensor(result["resumed"]["losses"]), torch.tensor(reference["losses"][SAVE_STEP:]),
                     rtol=1e-10, name="resumed losses")
        for key, value in result["resumed"]["state"].items():
            assert_close(value, reference["state"][key], rtol=1e-10, name=f"resumed {key}")


def test_stage_costs_count_the_routed_experts_active_share():
    """Blocks are balanced by matmul parameters per token: a dense (first_k_dense_replace) block
    counts its whole MLP, an MoE block its router, shared experts and top_k / n_routed of its
    routed experts, so the dense block 0 is the costliest here."""
    from lightning_attn_parallel.models import build_model
    from lightning_attn_parallel.parallel.pipeline_stages import block_costs

    cfg = ModelConfig(**MOE)
    costs, head = block_costs(build_model(cfg))
    d, e = cfg.d_model, cfg.n_routed_experts
    attention = costs[0] - 3 * d * cfg.ffn_dim
    moe = 3 * d * cfg.moe_ffn_dim * (cfg.moe_top_k + cfg.n_shared_experts) + e * d
    assert costs[1:] == [pytest.approx(attention + moe)] * 3 and costs[0] > costs[1]
    assert head == cfg.vocab_size * d
