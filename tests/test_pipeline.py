"""Pipeline parallelism through `Trainer(strategy=AttnHybridStrategy(plan=ParallelPlan(pp=...)))`
equals one process on the same global batch, for every schedule, and its checkpoints load
without pipelining.

One spawn of 4 gloo processes trains (fp64, gradient clipping on, 3 steps) pp=2 x dp=2 under
GPipe, 1F1B (with 2 batches accumulated per step) and interleaved 1F1B (2 stages per rank),
and pp=4 under 1F1B; then pp=2 x dp=2 saves a checkpoint folder after 2 steps, which replicated
data parallelism over the 4 ranks (pp=1) resumes to step 4. Losses and parameters are compared
with one process (relative error below 1e-10 in fp64).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_utils import assert_close, free_port, run_distributed
from lightning_utils import fp64_causal_lm, FixedTokens, LossRecorder, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.parallel.pipeline_stages import KeptBlocks, layout_of, split_into_stages
from lightning_attn_parallel.pipeline_plan import balanced_layout, bubble_fraction
from lightning_attn_parallel.plan import ParallelPlan, PlanError

TINY_LLAMA = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=32)
WORLD = 4
ROWS = 4  # sequences per data-parallel rank and batch
STEPS = 3
CLIP = 0.05  # small enough to clip every step: the norm must span the stages
CASES = {
    # name: (plan kwargs, accumulate_grad_batches)
    "gpipe_pp2_dp2": (dict(pp=2, pp_schedule="gpipe", pp_microbatches=4), 1),
    "1f1b_pp2_dp2_accumulate": (dict(pp=2, pp_schedule="1f1b", pp_microbatches=2), 2),
    "interleaved_pp2_dp2": (dict(pp=2, pp_schedule="interleaved_1f1b", pp_microbatches=2), 1),
    "1f1b_pp4": (dict(pp=4, pp_schedule="1f1b", pp_microbatches=4), 1),
}
# the same global batch (2 data-parallel ranks) on both sides; the loading plan has no pipeline
SAVE_PLAN, LOAD_PLAN = dict(pp=2, pp_microbatches=2), dict(tp=2)
STEPS_PER_EPOCH, SAVE_STEP, FINAL_STEP = 2, 2, 4



def make_module() -> lap.CausalLMModule:
    return fp64_causal_lm(TINY_LLAMA, FINAL_STEP)


def fit(plan_kwargs: dict, world: int, rank: int, max_steps: int, accumulate: int = 1, ckpt_path=None,
        save_path=None, limit=None, validate: bool = False) -> dict:
    module, recorder = make_module(), LossRecorder(average_over_ranks=True)
    dp = world // plan_kwargs.get("pp", 1) // plan_kwargs.get("tp", 1)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs)),
                            devices=world, max_steps=max_steps, accumulate_grad_batches=accumulate,
                            gradient_clip_val=CLIP, callbacks=[recorder], limit_train_batches=limit,
                            limit_val_batches=1 if validate else 0)
    # the mesh is (pp, dp, tp), tp innermost: the pp and tp ranks of a data-parallel rank see its samples
    dp_rank = (rank % (world // plan_kwargs.get("pp", 1))) // plan_kwargs.get("tp", 1)
    val = loader(FixedTokens(seed=1), ROWS, replicas=dp, rank=dp_rank) if validate else None
    trainer.fit(module, loader(FixedTokens(), ROWS, replicas=dp, rank=dp_rank), val, ckpt_path=ckpt_path)
    if save_path is not None:
        trainer.save_checkpoint(save_path)
    return {"losses": recorder.losses, "params": params_of(module), "start_params": recorder.start_params,
            "val": float(trainer.callback_metrics["val/loss"]) if validate else None}


def _worker(rank: int, world: int, root: str) -> dict:
    results = {name: fit(plan, world, rank, STEPS, accumulate) for name, (plan, accumulate) in CASES.items()}
    results["saved"] = fit(SAVE_PLAN, world, rank, SAVE_STEP, limit=STEPS_PER_EPOCH, save_path=f"{root}/pp2")
    results["resumed"] = fit(LOAD_PLAN, world, rank, FINAL_STEP, limit=STEPS_PER_EPOCH, ckpt_path=f"{root}/pp2")
    # and back: saved without pipelining (tp=2 x dp=2), resumed as pp=2 x dp=2, with validation
    fit(LOAD_PLAN, world, rank, SAVE_STEP, limit=STEPS_PER_EPOCH, save_path=f"{root}/tp2")
    results["resumed_pp"] = fit(SAVE_PLAN, world, rank, FINAL_STEP, limit=STEPS_PER_EPOCH, ckpt_path=f"{root}/tp2",
                                validate=True)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, WORLD, str(tmp_path_factory.mktemp("pipeline")), timeout=400)


def one_process(dp: int, max_steps: int, accumulate: int = 1, limit=None, validate: bool = False) -> dict:
    module, recorder = make_module(), LossRecorder()
    trainer = quiet_trainer(devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                            gradient_clip_val=CLIP, callbacks=[recorder], limit_train_batches=limit,
                            limit_val_batches=1 if validate else 0)
    trainer.fit(module, loader(FixedTokens(), ROWS * dp), loader(FixedTokens(seed=1), ROWS * dp) if validate else None)
    return {"losses": recorder.losses, "params": params_of(module),
            "val": float(trainer.callback_metrics["val/loss"]) if validate else None}


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_equals_one_process(results, name):
    plan, accumulate = CASES[name]
    reference = one_process(WORLD // plan["pp"], STEPS, accumulate)
    for rank, result in enumerate(results):
        got = result[name]
        # each rank holds its stage's parameters, under the whole model's names
        assert got["params"] and set(got["params"]) < set(reference["params"]), name
        for key, value in got["params"].items():
            assert_close(value, reference["params"][key], rtol=1e-10, name=f"{name} rank{rank} {key}")
        # the loss is computed on the last stage and shared: every rank logs the batch's loss
        # (its data-parallel rank's, which equals the global one to the same tolerance here)
        assert len(got["losses"]) == len(reference["losses"])
        assert_close(torch.tensor(got["losses"][0]), torch.tensor(reference["losses"][0]), rtol=1e-3)
    ranks_by_stage = {}
    for result in results:
        ranks_by_stage.setdefault(frozenset(result[name]["params"]), 0)
    covered = set().union(*ranks_by_stage)
    assert covered == set(reference["params"]), "the stages together hold the whole model"


def test_checkpoint_saved_under_pp_resumes_without_pipelining(results):
    """pp=2 x dp=2 saves a DCP folder at step 2 (state dict names unchanged); tp=2 x dp=2 on the
    same 4 ranks (no pipeline) loads it and continues with the uninterrupted single-process run's
    losses (averaged over the ranks) and parameters: model, optimizer and schedule came back."""
    reference = one_process(2, FINAL_STEP, limit=STEPS_PER_EPOCH)
    saved = {k: v for result in results for k, v in result["saved"]["params"].items()}
    for result in results:
        for key, value in result["resumed"]["start_params"].items():
            assert_close(value, saved[key], rtol=1e-12, name=f"loaded {key}")
        assert_close(torch.tensor(result["saved"]["losses"]), torch.tensor(reference["losses"][:SAVE_STEP]),
                     rtol=1e-10, name="saved losses")
        assert_close(torch.tensor(result["resumed"]["losses"]), torch.tensor(reference["losses"][SAVE_STEP:]),
                     rtol=1e-10, name="resumed losses")
        for key, value in result["resumed"]["params"].items():
            assert_close(value, reference["params"][key], rtol=1e-10, name=f"resumed {key}")


def test_checkpoint_saved_without_pipelining_resumes_under_pp(results):
    """The other way: tp=2 x dp=2 saves at step 2, pp=2 x dp=2 resumes (each stage loads only its
    own blocks from the folder) and equals the uninterrupted run, its validation (the forward-only
    schedule) included."""
    reference = one_process(2, FINAL_STEP, limit=STEPS_PER_EPOCH, validate=True)
    for result in results:
        got = result["resumed_pp"]
        assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"][SAVE_STEP:]),
                     rtol=1e-10, name="resumed losses")
        for key, value in got["params"].items():
            assert_close(value, reference["params"][key], rtol=1e-10, name=f"resumed under pp {key}")
        assert abs(got["val"] - reference["val"]) < 1e-10 * abs(reference["val"]), (got["val"], reference["val"])


# --------------------------------------------------------------------------- stages, no processes
def test_stages_keep_the_model_names_and_balance_the_head():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_LLAMA, "vocab_size": 4096, "n_layers": 6})
    model = build_model(cfg)
    plan = ParallelPlan(pp=2, pp_microbatches=2)
    # a 4096 x 32 head costs about 5 blocks here: the last stage gets fewer blocks
    assert layout_of(model, plan) == [5, 1]
    names = {n for n, _ in model.named_parameters()}
    stages = split_into_stages(model, plan, pp_rank=1)
    assert isinstance(model.blocks, KeptBlocks) and model.blocks.indices == [5]
    kept = {n for n, _ in model.named_parameters()}
    assert kept == {n for n in names if n.startswith(("blocks.5.", "norm.", "output."))}
    assert [s for s, _ in stages] == [1] and model.tok_embeddings is None
    assert model.blocks[0] is model.blocks[-1]


def test_layout_and_bubble_arithmetic():
    assert balanced_layout([1.0] * 8, 2) == [4, 4]
    assert balanced_layout([1.0] * 7, 4) == [1, 2, 2, 2]  # uneven: the larger stages come last
    assert balanced_layout([1.0] * 8, 2, last_cost=2.0) == [5, 3]
    assert bubble_fraction(4, 8) == pytest.approx(3 / 8)
    assert bubble_fraction(4, 8, virtual=2) == pytest.approx(3 / 16)
    assert bubble_fraction(1, 8) == 0.0


BAD_PLANS = {
    "pp vs world": (dict(pp=3), 4, None, ["pp=3", "world size 4"]),
    "too few micro-batches for 1f1b": (dict(pp=4, pp_microbatches=2), 4, None, ["pp_microbatches=2", "at least 4"]),
    "interleaved micro-batches": (dict(pp=2, pp_schedule="interleaved_1f1b", pp_microbatches=3), 2, None,
                                  ["pp_microbatches=3", "multiple of 2"]),
    "zero bubble with compile": (dict(pp=2, pp_schedule="zbv", compile="block"), 2, None, ["pp_schedule='zbv'", "interleaved_1f1b"]),
    "more stages than layers": (dict(pp=4, pp_schedule="interleaved_1f1b", pp_microbatches=4), 8, TINY_LLAMA,
                                ["8 stages", "n_layers=4"]),
    "layout not covering the model": (dict(pp=2, pp_layers_per_stage=[1, 2]), 2, TINY_LLAMA,
                                      ["pp_layers_per_stage=[1, 2]", "n_layers=4"]),
    "layout of the wrong length": (dict(pp=2, pp_layers_per_stage=[4]), 2, None, ["2 counts"]),
    "tied embeddings": (dict(pp=2), 2, {**TINY_LLAMA, "tie_embeddings": True}, ["tie_embeddings=false"]),
    "FSDP2 with tensor parallelism": (dict(pp=2, dp_shard=2, tp=2), 8, None, ["dp_shard=2", "tp=2", "tp=1"]),
    "FSDP2-cast stages with tensor parallelism": (dict(pp=2, tp=2, mixed_precision="cast_params"), 4, None,
                                                  ["cast_params", "tp=2", "tp=1"]),
    "FSDP2 with a mixture-of-experts model": (dict(pp=2, dp_shard=2), 4, {**TINY_LLAMA, "family": "deepseek",
                                              "n_routed_experts": 4, "moe_top_k": 2, "moe_ffn_dim": 32},
                                              ["dp_shard=2", "mixture-of-experts"]),
    "with a per-batch context-parallel degree": (dict(pp=2, cp=2, cp_min_seq_len=64), 4, None,
                                                 ["cp_min_seq_len=64", "cp_min_seq_len=0"]),
    "experts beyond a stage": (dict(pp=2, ep=4), 4, None, ["ep=4", "2 ranks of a pipeline stage"]),
}


@pytest.mark.parametrize("name", list(BAD_PLANS))
def test_bad_pipeline_plans_are_refused_in_one_line(name):
    kwargs, world, model, words = BAD_PLANS[name]
    with pytest.raises(PlanError) as info:
        ParallelPlan(**kwargs).resolve(world).check_model(ModelConfig(**model)) if model else \
            ParallelPlan(**kwargs).resolve(world)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_planner_prices_pipeline_degrees_for_dense_and_moe_models():
    """The dry run's pipeline lines: each pp degree with its bubble ((pp-1)/micro-batches under
    1F1B), p2p time and memory per GPU, then a verdict; MoE stages are priced with expert
    parallelism inside the stage, sized as the stage holding the most MoE blocks."""
    from lightning_attn_parallel.hardware import H100_SXM, ClusterSpec
    from lightning_attn_parallel.planning.dry_run import dry_run
    from lightning_attn_parallel.planning.pipeline import pipeline_option
    from lightning_attn_parallel.planning.select import make_workload

    cfg = ModelConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=4,
                      ffn_dim=5632, max_seq_len=2048)
    work = make_workload(cfg, ClusterSpec(num_nodes=2), H100_SXM, 2, 2048, "bf16-mixed", grad_accum=2)
    option = pipeline_option(work, 4)
    assert option.microbatches == 8 and option.bubble == pytest.approx(3 / 8)
    assert option.p2p_s > 0 and option.step_s > option.stage.timing.step_s
    text = dry_run(cfg, ClusterSpec(num_nodes=2), H100_SXM, micro_batch=2, seq_len=2048, grad_accum=2)
    assert "pp=2 (1F1B, 4 micro-batches, bubble 25%" in text and "verdict:" in text
    moe = ModelConfig(family="deepseek", vocab_size=1024, d_model=256, n_layers=4, n_heads=4, ffn_dim=512,
                      max_seq_len=512, n_routed_experts=8, moe_top_k=2, moe_ffn_dim=128, n_shared_experts=1)
    text = dry_run(moe, ClusterSpec(num_nodes=1), H100_SXM, micro_batch=1, seq_len=512)
    assert "replicated with tp, cp and ep, or FSDP2" in text
    assert "pp=2" in text and "verdict:" in text
    # DeepSeekMoE 16B on 8 GPUs: replicated over a stage's 4 GPUs, 14 blocks of experts do not
    # fit; split over ep=4 inside the stage they do
    moe16b = ModelConfig(family="deepseek", vocab_size=102400, d_model=2048, n_layers=28, n_heads=16,
                         ffn_dim=10944, max_seq_len=4096, n_routed_experts=64, moe_top_k=6, moe_ffn_dim=1408,
                         n_shared_experts=2, first_k_dense_replace=1)
    option = pipeline_option(make_workload(moe16b, ClusterSpec(num_nodes=1), H100_SXM, 1, 4096, "bf16-mixed"), 2)
    assert option.fits and option.stage.plan.ep > 1 and f"ep {option.stage.plan.ep}" in option.describe()
