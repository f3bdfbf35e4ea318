"""Data-parallel parity, accumulation and overlap of the attn_hybrid strategy on gloo.

Four processes (declared as 2 nodes x 2 ranks where hierarchical) against one process on the
same global batch: parameters after several optimizer steps must agree to 1e-5 (fp32).
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist

from dist_utils import assert_close, run_distributed
from lightning_utils import FixedTokens, UserModule, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.mesh import make_reduction_groups
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.parallel.gradient_reducer import GradientReducer

MICRO_BATCH = 2
TINY_LLAMA = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=32)

CASES = {
    # name: (module kind, accumulate_grad_batches, plan kwargs)
    "flat": ("user", 1, dict(hierarchical="never")),
    "flat_accumulate": ("user", 2, dict(hierarchical="never", bucket_mb=0.005)),
    "hierarchical_accumulate": ("user", 2, dict(hierarchical="always", ranks_per_node=2, bucket_mb=0.005)),
    "llama_auto_hierarchy": ("llama", 2, dict(hierarchical="auto", ranks_per_node=2, bucket_mb=0.01)),
    # a plain LightningModule (no model protocol) sharded: FSDP2 over 4 ranks, HSDP 2 x 2
    "user_fsdp2": ("user", 2, dict(dp_shard=4)),
    "user_hsdp": ("user", 1, dict(dp_shard=2)),
}


def make_module(kind: str) -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    if kind == "user":
        return UserModule()
    module = lap.CausalLMModule(ModelConfig(**TINY_LLAMA), lr=1e-2, warmup_steps=1, total_steps=4)
    module.configure_model()
    return module


def train(kind: str, accumulate: int, strategy, devices: int, batch_size: int, rank: int = 0) -> dict:
    module = make_module(kind)
    trainer = quiet_trainer(strategy=strategy, devices=devices, max_steps=3,
                            accumulate_grad_batches=accumulate)
    trainer.fit(module, loader(FixedTokens(), batch_size, replicas=devices, rank=rank))
    reducer = getattr(trainer.strategy, "gradient_reducer", None)
    return {"params": params_of(module), "buckets": len(reducer.buckets) if reducer else 0,
            "hierarchical": sum(b.hierarchical for b in reducer.buckets) if reducer else 0}


def _parity_worker(rank: int, world: int) -> dict:
    """Every case, counting the calls of the two-level all-reduce (the hierarchical path)."""
    from lightning_attn_parallel.parallel import gradient_reducer

    calls = {"n": 0}
    original = gradient_reducer.hierarchical_all_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    gradient_reducer.hierarchical_all_reduce = counting
    results = {}
    try:
        for name, (kind, accumulate, plan_kwargs) in CASES.items():
            strategy = lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs))
            calls["n"] = 0
            results[name] = train(kind, accumulate, strategy, world, MICRO_BATCH, rank)
            results[name]["hierarchical_calls"] = calls["n"]
    finally:
        gradient_reducer.hierarchical_all_reduce = original
    return results


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(_parity_worker, 4)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_single_process(distributed_results, name):
    kind, accumulate, _ = CASES[name]
    reference = train(kind, accumulate, "auto", 1, MICRO_BATCH * 4)["params"]
    for rank, result in enumerate(distributed_results):
        for key, expected in reference.items():
            assert_close(result[name]["params"][key], expected, name=f"{name} rank{rank} {key}")


STEPS = 3  # optimizer steps of `train`, each with one synchronised backward


def test_hierarchical_cases_really_ran_hierarchically(distributed_results):
    """Buckets marked hierarchical really went through the two-level all-reduce, once per step,
    and the flat ones never did."""
    for result in distributed_results:
        hier, flat = result["hierarchical_accumulate"], result["flat"]
        assert hier["hierarchical"] >= 2 and hier["hierarchical_calls"] == STEPS * hier["hierarchical"]
        assert flat["hierarchical"] == 0 and flat["hierarchical_calls"] == 0
        assert result["flat_accumulate"]["buckets"] >= 2 and result["flat_accumulate"]["hierarchical_calls"] == 0
        auto = result["llama_auto_hierarchy"]  # whatever the cost model chose ran as chosen
        assert auto["hierarchical_calls"] == STEPS * auto["hierarchical"]


# --------------------------------------------------------------------------- reducer behaviour
def _reducer_worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_LLAMA))
    group = make_reduction_groups([list(range(world))], "dense", 1.0 / world, ranks_per_node=world)
    reducer = GradientReducer([(list(model.parameters()), group)], bucket_mb=0.01)
    events: list[str] = []
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        events.append("collective")
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    # the embedding is the first layer: its gradient is the last one backward produces
    model.tok_embeddings.weight.register_post_accumulate_grad_hook(lambda p: events.append("first_layer"))
    tokens = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(rank))
    sent = []
    try:
        for micro in range(3):
            reducer.sync_enabled = micro == 2  # accumulate twice, then synchronise
            reducer.prepare_for_backward()
            before = calls["all_reduce"]
            model.logits(tokens).float().pow(2).mean().backward()
            reducer.finish()
            sent.append(calls["all_reduce"] - before)
    finally:
        dist.all_reduce = original
    return {"sent": sent, "buckets": len(reducer.buckets), "events": events,
            "during_backward": reducer.stats.launched_during_backward}


def test_accumulation_sends_nothing_and_sync_overlaps_backward():
    results = run_distributed(_reducer_worker, 2)
    for result in results:
        sent = result["sent"]
        assert sent[0] == 0 and sent[1] == 0, f"accumulating micro-batches sent {sent[:2]} collectives"
        assert sent[2] == result["buckets"] >= 3
        events = result["events"]
        last_first_layer = len(events) - 1 - events[::-1].index("first_layer")
        # every bucket but the embedding's is launched before the first layer's backward has run
        assert events[:last_first_layer].count("collective") >= result["buckets"] - 1 >= 2
        assert result["during_backward"] == result["buckets"]
