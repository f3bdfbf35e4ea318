"""Memory levers change memory, never results: activation checkpointing (attention, block,
selective, every n-th block), the chunked loss and the offload of saved activations each train
to the same parameters as the plain run (one process through the strategy, float64, where
recomputation must agree to round-off), and each lever really is in place: the checkpointed
blocks are counted, the LM head never sees more rows than a loss chunk, and with the offload no
saved activation escapes to the autograd graph's default storage."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from dist_utils import assert_close, run_distributed
from lightning_utils import FixedTokens, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.models import ModelConfig

MODEL = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
LEVERS = {
    "plain": ({}, None),
    "attention_checkpointing": (dict(activation_checkpointing="attention"), None),
    "block_checkpointing": (dict(activation_checkpointing="block"), None),
    "selective_checkpointing_every_2nd": (dict(activation_checkpointing="selective", ac_every_n=2), None),
    "chunked_loss": ({}, 24),
    "offload_and_block": (dict(activation_checkpointing="block", offload_activations=True), 24),
}


class SavedBytesOutsideHooks(L.Callback):
    """Bytes of the tensors autograd saves during each training step that reach this outermost
    saved-tensor hook: the ones no inner hook (the activation offload's save_on_cpu, activation
    checkpointing) took over."""

    def __init__(self) -> None:
        self.bytes = 0
        self._hooks = None

    def _pack(self, tensor):
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def on_train_batch_start(self, *args) -> None:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()

    def on_train_batch_end(self, *args) -> None:
        self._hooks.__exit__(None, None, None)


def _train_all(rank: int, world: int) -> dict:
    results = {}
    for name, (plan_kwargs, chunk) in LEVERS.items():
        L.seed_everything(0, verbose=False)
        module = lap.CausalLMModule(ModelConfig(**MODEL), lr=1e-2, warmup_steps=1, total_steps=3,
                                    loss_chunk_tokens=chunk)
        module.configure_model()
        head_rows: list[int] = []
        module.model.output.register_forward_hook(
            lambda mod, args, out: head_rows.append(args[0].shape[:-1].numel()))
        saved = SavedBytesOutsideHooks()
        strategy = lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs))
        trainer = quiet_trainer(strategy=strategy, devices=1, max_steps=3, precision="64-true",
                                callbacks=[saved])
        trainer.fit(module, loader(FixedTokens(), 4))
        results[name] = params_of(module)
        results[name]["checkpointed"] = sum(hasattr(m, "activation_checkpointed")
                                            for m in module.model.modules())
        results[name]["head_rows"] = max(head_rows)
        results[name]["saved_bytes"] = saved.bytes
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_train_all, 1)[0]


EXPECTED_CHECKPOINTED = {"plain": 0, "attention_checkpointing": 3, "block_checkpointing": 3,
                         "selective_checkpointing_every_2nd": 2, "chunked_loss": 0, "offload_and_block": 3}


LEVER_STATS = ("checkpointed", "head_rows", "saved_bytes")
TOKENS = 4 * 16  # rows the LM head sees per micro-batch without chunking


@pytest.mark.parametrize("name", list(LEVERS))
def test_chunked_loss_never_materialises_all_logits(results, name):
    chunk = LEVERS[name][1]
    assert results[name]["head_rows"] == (chunk if chunk else TOKENS)


def test_offload_leaves_no_saved_activation_in_place(results):
    assert results["plain"]["saved_bytes"] > results["block_checkpointing"]["saved_bytes"] > 0
    assert results["offload_and_block"]["saved_bytes"] == 0


@pytest.mark.parametrize("name", [n for n in LEVERS if n != "plain"])
def test_lever_trains_the_same_model(results, name):
    assert results[name]["checkpointed"] == EXPECTED_CHECKPOINTED[name]
    for key, expected in results["plain"].items():
        if key in LEVER_STATS:
            continue
        assert_close(results[name][key], expected, rtol=1e-10, name=f"{name} {key}")
