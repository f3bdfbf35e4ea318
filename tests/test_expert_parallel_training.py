"""Expert parallelism through the strategy: MoE training on 4 gloo ranks equals one process.

ep=4 (each rank one quarter of the experts, attention data parallel over the same ranks) and
ep=2 (two expert-parallel groups, experts replicated over edp=2), with the auxiliary balance loss
and the auxiliary-loss-free bias update on.
"""
from __future__ import annotations

import lightning as L
import pytest

from dist_utils import assert_close, run_distributed
from lightning_utils import FixedTokens, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.models import ModelConfig

MOE = dict(family="deepseek", attention="mla", vocab_size=64, d_model=32, n_layers=3, n_heads=4,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, ffn_dim=64,
           max_seq_len=32, n_routed_experts=8, n_shared_experts=1, moe_top_k=2, moe_ffn_dim=16,
           first_k_dense_replace=1, aux_loss_coef=0.01, bias_update_speed=0.001)
CASES = {"ep4": dict(ep=4), "ep2_edp2": dict(ep=2)}
STEPS = 3


def train(plan_kwargs, world, rank=0, micro_batch=2):
    L.seed_everything(0, verbose=False)
    module = lap.CausalLMModule(ModelConfig(**MOE), lr=1e-2, warmup_steps=1, total_steps=STEPS)
    module.configure_model()
    strategy = lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs)) if world > 1 else "auto"
    trainer = quiet_trainer(strategy=strategy, devices=world, max_steps=STEPS)
    trainer.fit(module, loader(FixedTokens(), micro_batch, replicas=world, rank=rank))
    params = params_of(module)
    if world > 1:  # gather the expert slices: rank r holds experts [r*E/ep, (r+1)*E/ep)
        params = {k: v for k, v in params.items() if ".experts." not in k}
        params.update(expert_slices(module))
    return params


def expert_slices(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if ".experts." in name}


def _worker(rank, world):
    return {name: train(plan, world, rank) for name, plan in CASES.items()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 4)


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_training_equals_one_process(results, name):
    ep = CASES[name]["ep"]
    reference = train({}, 1, micro_batch=8)
    for rank, result in enumerate(results):
        ep_rank = rank % ep
        for key, expected in reference.items():
            if ".experts." in key:
                per_rank = expected.shape[0] // ep
                expected = expected[ep_rank * per_rank:(ep_rank + 1) * per_rank]
            assert_close(result[name][key], expected, name=f"{name} rank{rank} {key}")
