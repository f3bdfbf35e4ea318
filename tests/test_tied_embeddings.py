"""Tied embeddings stay one tensor through every path that builds, moves, trains, saves and
exports a model, and a checkpoint whose tied tensors trained apart is refused, never half-used.

Each test trains between load and save: a tie that breaks only shows once the two tensors are
updated apart. Parity: fp32 relative error < 1e-5.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_utils import assert_close, run_distributed

transformers = pytest.importorskip("transformers")

import lightning_attn_parallel as lap  # noqa: E402
from lightning_attn_parallel.checkpoint import CheckpointError  # noqa: E402
from lightning_attn_parallel.errors import UserError  # noqa: E402
from lightning_attn_parallel.models import ModelConfig, build_model  # noqa: E402
from lightning_attn_parallel.models.hf import Checkpoint, from_pretrained, save_pretrained  # noqa: E402
from lightning_attn_parallel.models.materialize import materialize  # noqa: E402

VOCAB = 96
TOKENS = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(5))
STEPS = 3
PLANS = {"replicated": dict(), "fsdp2": dict(dp_shard=2), "tp2": dict(tp=2)}


def tied_llama_folder(folder: Path) -> Path:
    """A random tied Llama written by transformers itself (as SmolLM2 or Llama 3.2 are)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=True, initializer_range=0.2, attn_implementation="eager")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # transformers read it as tied
    with torch.no_grad():
        return hf(tokens).logits


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(tokens)


def tied_count(cfg: ModelConfig) -> int:
    """Parameters of the tied model: the untied model's less one vocabulary x width head."""
    untied = build_model(ModelConfig(**{**cfg.__dict__, "tie_embeddings": False}))
    return sum(p.numel() for p in untied.parameters()) - cfg.vocab_size * cfg.d_model


def test_meta_build_and_materialize_keep_the_tie():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      max_seq_len=32, tie_embeddings=True)
    with torch.device("meta"):
        model = build_model(cfg)
    materialize(model, "cpu")
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == tied_count(cfg)
    assert torch.isfinite(model.blocks[0].attention.rope.cos).all()  # buffers no checkpoint holds


def test_from_pretrained_train_save_pretrained_one_process(tmp_path):
    """The minimal reproduction: load a tied folder, take optimizer steps, save: transformers'
    logits on the saved folder equal the trained model's."""
    model = from_pretrained(tied_llama_folder(tmp_path / "src"))
    assert sum(p.numel() for p in model.parameters()) == tied_count(model.config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    start = model.output.weight.detach().clone()
    for step in range(STEPS):
        logits = model.logits(TOKENS[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert model.output.weight is model.tok_embeddings.weight, f"untied after step {step}"
    assert not torch.equal(model.output.weight, start), "it trained"
    save_pretrained(model, tmp_path / "out", dtype=torch.float32)
    tokens = TOKENS[:2, :-1]
    assert_close(hf_logits(tmp_path / "out", tokens), logits_of(model.eval(), tokens), rtol=1e-5,
                 name="saved after training")


# ---------------------------------------------------------------------------- the Trainer path
class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return STEPS * 8

    def __getitem__(self, i):
        row = TOKENS[i % len(TOKENS)]
        return {"input_ids": row[:-1], "labels": row[1:]}


def _train_under_plans(rank: int, world: int, root: str) -> dict:
    """model.pretrained= under each plan on `world` gloo ranks: train, check the tie after every
    step, export as an HF folder at the end of the run."""
    import lightning as L
    from lightning_utils import params_of, quiet_trainer

    from lightning_attn_parallel.export import export_model

    class TieWatcher(L.Callback):
        def __init__(self):
            self.tied: list[bool] = []

        def on_train_batch_end(self, trainer, module, *args):
            self.tied.append(module.model.output.weight is module.model.tok_embeddings.weight)

    out = {}
    for name, plan in PLANS.items():
        src = f"{root}/src"
        L.seed_everything(0, verbose=False)
        module = lap.CausalLMModule(Checkpoint(src).model_config(), pretrained=src, lr=1e-2,
                                    warmup_steps=1, total_steps=STEPS)
        watcher = TieWatcher()
        trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan)),
                                devices=world, max_steps=STEPS, callbacks=[watcher])
        trainer.fit(module, torch.utils.data.DataLoader(_Tokens(), batch_size=2))  # sampler: Lightning's
        export_model(module.model, f"{root}/{name}", fmt="hf", dtype="fp32")
        out[name] = dict(tied=watcher.tied, params=params_of(module.model),
                         count=sum(p.numel() for p in module.parameters()))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    tied_llama_folder(root / "src")
    return root, run_distributed(_train_under_plans, 2, str(root), timeout=600)


@pytest.mark.parametrize("plan", list(PLANS))
def test_trained_under_plan_exports_the_trained_model(trained, plan):
    """Replicated, FSDP2 x 2 and tp=2: the tie holds after every step, the parameter count is the
    tied count, and transformers' logits on the end-of-run export equal the trained model's."""
    root, results = trained
    cfg = Checkpoint(root / "src").model_config()
    model = build_model(cfg).eval()
    for rank, result in enumerate(results):
        r = result[plan]
        assert r["tied"] == [True] * STEPS, (plan, rank, r["tied"])
        assert r["count"] == tied_count(cfg), (plan, rank)
    missing, unexpected = model.load_state_dict(results[0][plan]["params"], strict=False)
    assert not unexpected and all(k.startswith("blocks.") and "rope" in k or k == "output.weight"
                                  for k in missing), missing
    start = from_pretrained(root / "src")
    assert not torch.equal(model.tok_embeddings.weight, start.tok_embeddings.weight), "it trained"
    tokens = TOKENS[:2, :-1]
    assert_close(hf_logits(root / plan, tokens), logits_of(model, tokens), rtol=1e-5,
                 name=f"{plan}: transformers on the export vs the trained model")


# ---------------------------------------------------------------------------- old checkpoints
def _untied_checkpoint(tmp_path: Path) -> tuple[Path, ModelConfig]:
    """A .ckpt whose config says tied but whose head trained apart from the embedding, as the
    loader before this fix wrote them."""
    from lightning_utils import quiet_trainer

    src = tied_llama_folder(tmp_path / "src")
    cfg = Checkpoint(src).model_config()
    module = lap.CausalLMModule(cfg, lr=1e-2, warmup_steps=1, total_steps=1)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(save_distributed_checkpoint=False),
                            devices=1, max_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(_Tokens(), batch_size=2))
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    head = checkpoint["state_dict"]["model.tok_embeddings.weight"].clone()
    checkpoint["state_dict"]["model.output.weight"] = head + 1e-3 * torch.randn_like(head)
    torch.save(checkpoint, path)
    return path, cfg


def test_checkpoint_whose_tied_tensors_differ_is_refused_at_export_and_exported_untied(tmp_path):
    from lightning_attn_parallel.export import export

    path, cfg = _untied_checkpoint(tmp_path)
    with pytest.raises(UserError, match="output.weight differs from tok_embeddings.weight.*--untie-embeddings"):
        export(path, tmp_path / "refused", dtype="fp32")
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    export(path, tmp_path / "untied", dtype="fp32", untie_embeddings=True)
    state = torch.load(path, weights_only=False)["state_dict"]
    model = build_model(ModelConfig(**{**cfg.__dict__, "tie_embeddings": False})).eval()
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "untied", attn_implementation="eager").eval()
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight
    tokens = TOKENS[:2, :-1]
    with torch.no_grad():
        assert_close(hf(tokens).logits, logits_of(model, tokens), rtol=1e-5, name="untied export")


def test_checkpoint_whose_tied_tensors_differ_is_refused_at_resume(tmp_path):
    from lightning_utils import quiet_trainer

    path, cfg = _untied_checkpoint(tmp_path)
    module = lap.CausalLMModule(cfg, lr=1e-2, warmup_steps=1, total_steps=2)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(), devices=1, max_steps=2)
    with pytest.raises(CheckpointError, match="output.weight.*tok_embeddings.weight.*ties them"):
        trainer.fit(module, torch.utils.data.DataLoader(_Tokens(), batch_size=2), ckpt_path=path)


def _resume_tied_folder(rank: int, world: int, root: str) -> list[bool]:
    """FSDP2 x 2 saves a checkpoint folder; a fresh run resumes it: still tied, and a folder whose
    head differs from its embedding is refused."""
    import lightning as L
    from lightning_utils import loader, quiet_trainer

    src = f"{root}/src"
    cfg = Checkpoint(src).model_config()
    seen = []
    for resume in (None, f"{root}/ckpt"):
        L.seed_everything(0, verbose=False)
        module = lap.CausalLMModule(cfg, lr=1e-2, warmup_steps=1, total_steps=4)
        trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(dp_shard=2)),
                                devices=world, max_steps=2 if resume is None else 3)
        trainer.fit(module, loader(_Tokens(), 2, replicas=world, rank=rank), ckpt_path=resume)
        seen.append(module.model.output.weight is module.model.tok_embeddings.weight)
        if resume is None:
            trainer.save_checkpoint(f"{root}/ckpt")
    return seen


def test_fsdp2_checkpoint_folder_resumes_tied(tmp_path):
    tied_llama_folder(tmp_path / "src")
    for rank, seen in enumerate(run_distributed(_resume_tied_folder, 2, str(tmp_path), timeout=600)):
        assert seen == [True, True], rank
