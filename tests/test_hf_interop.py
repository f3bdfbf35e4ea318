"""Hugging Face checkpoints in and out, against transformers itself.

Tiny random models are built with transformers' own config classes and written with its
`save_pretrained`; nothing downloads. Parity: fp32 relative error < 1e-5, fp64 < 1e-10.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_utils import assert_close

transformers = pytest.importorskip("transformers")

from lightning_attn_parallel.models import ModelConfig, build_model  # noqa: E402
from lightning_attn_parallel.models.hf import (  # noqa: E402
    Checkpoint, from_pretrained, model_config_from_hf, save_pretrained)
from lightning_attn_parallel.models.rope import (  # noqa: E402
    RopeScaling, inverse_frequencies, rotation_scale, softmax_scale_factor)

VOCAB = 96
TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
# Published DeepSeek-V2-Lite values (factor 40, mscale 0.707), pre-training length shrunk to 16.
YARN_V2 = dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=16, beta_fast=32,
               beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
YARN_V3 = dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=16, beta_fast=32,
               beta_slow=1, mscale=1.0, mscale_all_dim=1.0)


def llama_config(rope=None, heads=4, kv_heads=2, tie=False, theta=10000.0):
    rope_parameters = dict(rope_type="default", rope_theta=theta) | (rope or {})
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters=rope_parameters,
        initializer_range=0.2, attn_implementation="eager")


def deepseek_config(version=2, rope=None, q_lora=None, groups=(1, 1), experts=8, top_k=2,
                    interleave=True, **extra):
    rope_parameters = dict(rope_type="default", rope_theta=10000.0) | (rope or {})
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                  q_lora_rank=q_lora, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=top_k,
                  moe_intermediate_size=16, first_k_dense_replace=1, n_group=groups[0],
                  topk_group=groups[1], rms_norm_eps=1e-6, rope_parameters=rope_parameters,
                  initializer_range=0.2, attn_implementation="eager")
    if version == 2:
        method = "group_limited_greedy" if groups[1] < groups[0] else "greedy"
        return transformers.DeepseekV2Config(topk_method=method, **(common | extra))
    return transformers.DeepseekV3Config(rope_interleave=interleave, **(common | extra))


def save_hf(config, folder: Path, selection_bias: bool = False):
    """A random transformers model (random selection biases for V3) saved at `folder`."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    if selection_bias:
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.3)
    hf.save_pretrained(folder)
    return hf


def hf_rope(hf):
    return hf.model.rotary_emb


def lift_to_fp64(hf, cfg: ModelConfig, monkeypatch) -> None:
    """Make transformers compute in float64 where it otherwise drops to float32 whatever the
    model dtype: RMSNorm, eager attention's softmax (SDPA instead), the RoPE angles and V2's
    complex rotation. The RoPE frequencies are first checked against transformers' own (fp32)
    ones, then used in fp64. transformers also scores routers in fp32 whatever the dtype, while
    the project's router follows the tokens' dtype: for the comparison it scores in fp32 too."""
    from lightning_attn_parallel.models.deepseek import Router

    def scores_in_fp32(self, tokens):
        logits = torch.nn.functional.linear(tokens.float(), self.gate.weight.float())
        return logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()

    monkeypatch.setattr(Router, "scores", scores_in_fp32)
    hf.double()
    hf.set_attn_implementation("sdpa")
    if hasattr(hf.config, "n_routed_experts"):
        hf.set_experts_implementation("eager")  # the grouped GEMM has no fp64 kernel
    dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
    scaling = RopeScaling.of(cfg)
    inv_freq = inverse_frequencies(dim, cfg.rope_theta, scaling)
    rope = hf_rope(hf)
    assert_close(rope.original_inv_freq.double(), inv_freq, rtol=1e-6, name="inv_freq")
    assert rope.attention_scaling == pytest.approx(rotation_scale(scaling), rel=1e-12)
    complex_rope = type(hf).__name__.startswith("DeepseekV2")

    def rope_forward(x, position_ids):
        freqs = position_ids[..., None].double() * inv_freq
        if complex_rope:
            return torch.polar(torch.ones_like(freqs), freqs) * rope.attention_scaling
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * rope.attention_scaling, emb.sin() * rope.attention_scaling

    rope.forward = rope_forward
    for module in hf.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = (lambda m: lambda h: m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)
                                                                             + m.variance_epsilon)))(module)
    if complex_rope:
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2

        def rotate(xq, xk, freqs_cis):
            q = torch.view_as_complex(xq.reshape(*xq.shape[:-1], -1, 2))
            k = torch.view_as_complex(xk.reshape(*xk.shape[:-1], -1, 2))
            f = freqs_cis.unsqueeze(1)
            return torch.view_as_real(q * f).flatten(3), torch.view_as_real(k * f).flatten(3)

        monkeypatch.setattr(v2, "apply_rotary_emb", rotate)


def logits_of(model, tokens=TOKENS):
    with torch.no_grad():
        return model.logits(tokens)


def hf_logits(hf, tokens=TOKENS):
    with torch.no_grad():
        return hf(tokens).logits


CASES = {
    "llama2_mha": lambda: llama_config(heads=4, kv_heads=4),
    "llama3_gqa_theta": lambda: llama_config(kv_heads=2, theta=500000.0),
    "llama31_mqa_tied": lambda: llama_config(LLAMA3, kv_heads=1, tie=True, theta=500000.0),
    "llama_yarn": lambda: llama_config(dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    "v2_lite_yarn_greedy": lambda: deepseek_config(2, YARN_V2),
    "v2_qlora_group_limited": lambda: deepseek_config(2, q_lora=24, groups=(4, 2), routed_scaling_factor=16.0),
    "v3_qlora_sigmoid_bias_yarn": lambda: deepseek_config(3, YARN_V3, q_lora=24, groups=(4, 2),
                                                          norm_topk_prob=True, routed_scaling_factor=2.5),
    "v3_rotate_half": lambda: deepseek_config(3, q_lora=None, groups=(2, 1), interleave=False,
                                              norm_topk_prob=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_matches_transformers(case, tmp_path, monkeypatch):
    hf = save_hf(CASES[case](), tmp_path, selection_bias=case.startswith("v3"))
    model = from_pretrained(tmp_path).eval()
    assert_close(logits_of(model), hf_logits(hf), rtol=1e-5, name=f"{case} fp32")
    model64 = from_pretrained(tmp_path, dtype=torch.float64).eval()
    lift_to_fp64(hf, model64.config, monkeypatch)
    assert_close(logits_of(model64), hf_logits(hf), rtol=1e-10, name=f"{case} fp64")


@pytest.mark.parametrize("case", ["llama31_mqa_tied", "v2_lite_yarn_greedy", "v3_qlora_sigmoid_bias_yarn"])
def test_save_loads_in_transformers(case, tmp_path, monkeypatch):
    """Project model -> save_pretrained -> transformers: same logits (fp32 and fp64), and back."""
    hf_cfg = CASES[case]()
    save_hf(hf_cfg, tmp_path / "src", selection_bias=case.startswith("v3"))
    model = from_pretrained(tmp_path / "src", dtype=torch.float64).eval()
    with torch.no_grad():  # move away from the source weights so that a copy cannot pass
        for p in model.parameters():
            p.mul_(1.5)
    save_pretrained(model, tmp_path / "out", dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert_close(hf_logits(hf), logits_of(model), rtol=1e-5, name=f"{case} saved fp32")
    save_pretrained(model, tmp_path / "out64", dtype=torch.float64, max_shard_size="20KB")
    assert (tmp_path / "out64" / "model.safetensors.index.json").exists()
    hf64 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out64", attn_implementation="eager",
                                                             dtype=torch.float64).eval()
    lift_to_fp64(hf64, model.config, monkeypatch)
    assert_close(hf_logits(hf64), logits_of(model), rtol=1e-10, name=f"{case} saved fp64")
    back = from_pretrained(tmp_path / "out64", dtype=torch.float64).eval()
    assert_close(logits_of(back), logits_of(model), rtol=1e-12, name=f"{case} round trip")


def test_fused_and_per_expert_layouts_load_alike(tmp_path):
    """transformers 5 holds experts fused (gate_up_proj, down_proj) in memory and writes them per
    expert; a folder of either layout loads to the same model."""
    from safetensors.torch import save_file

    hf = save_hf(CASES["v3_qlora_sigmoid_bias_yarn"](), tmp_path / "per_expert", selection_bias=True)
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    (fused / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    a = from_pretrained(tmp_path / "per_expert").eval()
    b = from_pretrained(fused).eval()
    assert_close(logits_of(b), hf_logits(hf), rtol=1e-5, name="fused layout")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("rope", [LLAMA3 | dict(original_max_position_embeddings=8192),
                                  YARN_V2 | dict(original_max_position_embeddings=4096),
                                  YARN_V3 | dict(original_max_position_embeddings=4096)])
def test_rope_scalings_match_transformers_at_published_sizes(rope):
    """Frequencies and attention factor of the published Llama-3.1 and DeepSeek configs."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope["rope_type"] == "llama3":
        hf_cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                          rope_parameters=dict(rope_theta=500000.0) | rope)
        dim, theta = 128, 500000.0
    else:
        hf_cfg = transformers.DeepseekV3Config(max_position_embeddings=163840,
                                               rope_parameters=dict(rope_theta=10000.0) | rope)
        dim, theta = 64, 10000.0
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg)
    cfg = model_config_from_hf(hf_cfg.to_dict())
    scaling = RopeScaling.of(cfg)
    ours = inverse_frequencies(dim, theta, scaling)
    plain = inverse_frequencies(dim, theta)
    assert_close(ours, inv_freq.double(), rtol=1e-6, name="inv_freq")
    assert rotation_scale(scaling) == pytest.approx(factor, rel=1e-12)
    assert (ours != plain).sum() > dim // 8, "the scaling should change many frequencies"
    if rope["rope_type"] == "yarn" and rope["mscale"] == 0.707:  # V2-Lite: softmax scale x ~1.59
        assert softmax_scale_factor(scaling) == pytest.approx((0.1 * 0.707 * math.log(40) + 1) ** 2)
        assert (ours != plain).sum() == 21


# ---------------------------------------------------------------------------- bad input
def test_unsupported_config_fields_name_the_field(tmp_path):
    base = llama_config().to_dict()
    with pytest.raises(ValueError, match="model_type='mistral'"):
        model_config_from_hf(base | dict(model_type="mistral"))
    with pytest.raises(ValueError, match="rope_scaling.rope_type='dynamic'"):
        model_config_from_hf(base | dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        model_config_from_hf(base | dict(hidden_act="gelu"))
    with pytest.raises(ValueError, match="attention_bias=True"):
        model_config_from_hf(base | dict(attention_bias=True))
    v3 = deepseek_config(3).to_dict()
    with pytest.raises(ValueError, match="quantization_config"):
        model_config_from_hf(v3 | dict(quantization_config={"quant_method": "fp8"}))


def test_missing_shard_and_mismatched_tensors_are_named(tmp_path):
    model = build_model(model_config_from_hf(llama_config().to_dict()))
    save_pretrained(model, tmp_path / "sharded", max_shard_size="10KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ValueError, match=f"shard {shards[1].name} named by model.safetensors.index.json is missing"):
        from_pretrained(tmp_path / "sharded")
    save_pretrained(model, tmp_path / "wrong")
    config = json.loads((tmp_path / "wrong" / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(config | dict(intermediate_size=64)))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(48, 32\) but config.json implies \(64, 32\)"):
        from_pretrained(tmp_path / "wrong")
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(config | dict(num_hidden_layers=1)))
    with pytest.raises(ValueError, match="model.layers.1.* has no place"):
        from_pretrained(tmp_path / "wrong")


# ---------------------------------------------------------------------------- under a plan
PLANS = {  # plan -> the HF model it loads
    "tp2_dp_shard2": (dict(tp=2, dp_shard=2, dp_replicate=1), "llama"),
    "ep4": (dict(ep=4), "v3"),
    "cp2_dp2": (dict(cp=2, dp_shard=2, dp_replicate=1, cp_kernel="allgather"), "v2"),
}
FOLDERS = {"llama": lambda: llama_config(LLAMA3, kv_heads=2, theta=500000.0),
           "v3": CASES["v3_rotate_half"],
           "v2": CASES["v2_lite_yarn_greedy"]}
VAL_TOKENS = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))


class _Batches(torch.utils.data.Dataset):
    """The same 4 sequences on every rank: the mean loss is then that of the 4 sequences."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return {"input_ids": VAL_TOKENS[:, :-1], "labels": VAL_TOKENS[:, 1:]}


def _load_under_plans(rank: int, world: int, root: str) -> dict:
    import lightning as L
    from lightning_utils import quiet_trainer

    import lightning_attn_parallel as lap
    from lightning_attn_parallel.checkpoint import export_consolidated
    from lightning_attn_parallel.pretrained import load_pretrained
    from torch.distributed.tensor import DTensor

    import lightning_attn_parallel.module as module_file

    built_on = []  # the device of every model CausalLMModule builds: the whole model never exists
    build = module_file.build_model
    module_file.build_model = lambda cfg: built_on.append(torch.get_default_device().type) or build(cfg)
    out = {}
    for name, (plan, folder) in PLANS.items():
        path = f"{root}/{folder}"
        cfg = Checkpoint(path).model_config()
        L.seed_everything(1, verbose=False)
        module = lap.CausalLMModule(cfg, pretrained=path)
        trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan)), devices=world,
                                limit_val_batches=1)
        data = torch.utils.data.DataLoader(_Batches(), batch_size=None)
        metrics = trainer.validate(module, data, verbose=False)[0]
        if name == "ep4":  # a sharded checkpoint folder, for the export test
            trainer.save_checkpoint(f"{root}/ep4_ckpt", weights_only=True)
        export_consolidated(f"{root}/{name}.pt", module.model)
        again = load_pretrained(module.model, path)  # the same load, to count what this rank reads
        local = 0
        for key, tensor in module.model.state_dict(keep_vars=True).items():
            if key.endswith(("rope.cos", "rope.sin")):
                continue
            t = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            local += t.numel() * 4  # the folders are fp32
        out[name] = dict(val_loss=metrics["val/loss"], bytes_read=again.bytes_read, local_bytes=local,
                         built_on=built_on.pop())
    return out


@pytest.fixture(scope="module")
def under_plans(tmp_path_factory):
    """One spawn of 4 gloo ranks loads each folder under its plan (and saves an ep=4 checkpoint)."""
    from dist_utils import run_distributed

    root = tmp_path_factory.mktemp("plans")
    hf = {name: save_hf(make(), root / name, selection_bias=name == "v3") for name, make in FOLDERS.items()}
    (root / "v3" / "tokenizer.json").write_text('{"version": "1.0"}')
    return root, hf, run_distributed(_load_under_plans, 4, str(root), timeout=600)


def test_load_under_plans_matches_transformers(under_plans):
    """tp2 x dp_shard2 (FSDP2 over tensor-parallel shards), ep4 and cp2 x dp_shard2 on 4 gloo
    ranks: the validation loss of the parallel model and the gathered weights' logits equal
    transformers'; each rank reads little more than the slices it holds."""
    tmp_path, hf, results = under_plans
    for name, (plan, folder) in PLANS.items():
        with torch.no_grad():
            logits = hf[folder](VAL_TOKENS[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), VAL_TOKENS[:, 1:].flatten())
        cfg = Checkpoint(tmp_path / folder).model_config()
        model = build_model(cfg).eval()
        model.load_state_dict(torch.load(tmp_path / f"{name}.pt", weights_only=True))
        assert_close(logits_of(model, VAL_TOKENS[:, :-1]), logits, rtol=1e-5, name=f"{name} gathered logits")
        for rank, result in enumerate(results):
            r = result[name]
            assert r["built_on"] == "meta", (name, rank, r)  # allocated only after the plan sharded it
            assert r["val_loss"] == pytest.approx(loss.item(), rel=1e-5), f"{name} rank {rank} loss"
            total = sum(p.stat().st_size for p in (tmp_path / folder).glob("*.safetensors"))
            # whole heads around a cut: at most a few KiB per tensor over the rank's own share
            assert r["bytes_read"] <= 1.25 * r["local_bytes"] + 32 * 1024, (name, rank, r)
            if "dp_shard" in plan:  # sharded everywhere: a rank reads about a quarter
                assert r["bytes_read"] < 0.4 * total, (name, rank, r, total)
            print(f"{name} rank {rank}: read {r['bytes_read']} B, holds {r['local_bytes']} B, folder {total} B")


# ---------------------------------------------------------------------------- export
def _save_one_process_checkpoint(rank: int, world: int, root: str) -> None:
    """One process loads the folder and saves a single .ckpt file."""
    from lightning_utils import quiet_trainer

    import lightning_attn_parallel as lap

    path = f"{root}/v3"
    module = lap.CausalLMModule(Checkpoint(path).model_config(), pretrained=path)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(save_distributed_checkpoint=False),
                            devices=1, limit_val_batches=1)
    trainer.validate(module, torch.utils.data.DataLoader(_Batches(), batch_size=None), verbose=False)
    trainer.save_checkpoint(f"{root}/one.ckpt", weights_only=True)


def test_export_from_ep4_folder_equals_export_from_one_process_file(under_plans):
    """Experts are not lost under ep=4: the export of the ep=4 checkpoint folder and that of a
    one-process .ckpt file hold the same tensors, which transformers loads with the source
    model's logits; the source folder's tokenizer files come along."""
    from dist_utils import run_distributed
    from safetensors.torch import load_file

    from lightning_attn_parallel.export import main as export_main

    tmp_path, hf_models, _ = under_plans
    hf = hf_models["v3"]
    run_distributed(_save_one_process_checkpoint, 1, str(tmp_path), timeout=600)
    assert (tmp_path / "ep4_ckpt").is_dir() and (tmp_path / "one.ckpt").is_file()
    export_main([str(tmp_path / "ep4_ckpt"), str(tmp_path / "from_ep4"), "--dtype", "fp32", "--max-shard-size", "50KB"])
    export_main([str(tmp_path / "one.ckpt"), str(tmp_path / "from_one"), "--dtype", "fp32"])

    def tensors(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    a, b = tensors(tmp_path / "from_ep4"), tensors(tmp_path / "from_one")
    assert len(list((tmp_path / "from_ep4").glob("*.safetensors"))) > 1, "50KB shards expected"
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(".experts." in k for k in a) == 2 * 3 * 8  # 2 MoE layers x 3 projections x 8 experts
    assert json.loads((tmp_path / "from_ep4" / "config.json").read_text()) == \
        json.loads((tmp_path / "from_one" / "config.json").read_text())
    assert (tmp_path / "from_ep4" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from_ep4", attn_implementation="eager")
    assert_close(hf_logits(exported.eval()), hf_logits(hf), rtol=1e-5, name="exported from ep=4")


# ---------------------------------------------------------------------------- train.py
def test_train_from_pretrained_and_export_hf(tmp_path):
    """python train.py model.pretrained=PATH ... export_format=hf: the run trains the folder's
    model and ends in a folder (tokenizer files included) that transformers loads with the
    trained model's logits."""
    import subprocess
    import sys

    from test_cli import QUICK, ROOT

    hf_cfg = llama_config(LLAMA3, kv_heads=2, theta=500000.0)
    hf_cfg.vocab_size = 256  # the embedded data is bytes
    save_hf(hf_cfg, tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, "train.py", f"model.pretrained={tmp_path / 'src'}", "trainer.max_steps=2",
         "trainer.accelerator=cpu", "trainer.devices=1", "data.seq_len=32", "data.micro_batch_size=2",
         "trainer.limit_val_batches=0", f"run_dir={tmp_path / 'run'}", f"export_path={tmp_path / 'out'}",
         "export_format=hf", "export_dtype=fp32"] + QUICK, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    trained = from_pretrained(tmp_path / "out").eval()
    start = from_pretrained(tmp_path / "src").eval()
    assert not torch.equal(trained.tok_embeddings.weight, start.tok_embeddings.weight), "it trained"
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    tokens = TOKENS % 256
    assert_close(hf_logits(exported.eval(), tokens), logits_of(trained, tokens), rtol=1e-5, name="train.py export")


def test_recipe_disagreeing_with_config_json_is_one_line(tmp_path):
    import subprocess
    import sys

    from test_cli import QUICK, ROOT

    save_hf(llama_config(), tmp_path / "src")
    result = subprocess.run([sys.executable, "train.py", "+recipe=llama3_8b", f"model.pretrained={tmp_path / 'src'}",
                             f"run_dir={tmp_path / 'run'}"] + QUICK,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.d_model=4096 in recipe llama3_8b but "), lines
    assert "config.json says 32" in lines[0]


def test_command_line_overrides_win_and_bad_input_is_named(tmp_path):
    from test_cli import QUICK, compose_config

    from lightning_attn_parallel.cli import run
    from lightning_attn_parallel.pretrained import model_config_for

    save_hf(llama_config(LLAMA3), tmp_path / "src")
    values = dict(model_config_from_hf(llama_config(LLAMA3).to_dict()).__dict__)
    cfg = model_config_for(tmp_path / "src", values | dict(rope_factor=16.0), "llama3_1_8b",
                           overridden={"rope_factor"})
    assert cfg.rope_factor == 16.0 and cfg.rope_scaling == "llama3"
    with pytest.raises(ValueError, match=r"model.rope_factor=16.0 in recipe llama3_1_8b but .* says 8.0"):
        model_config_for(tmp_path / "src", values | dict(rope_factor=16.0), "llama3_1_8b", overridden=set())
    # the data's vocabulary (bytes: 256) does not fit the folder's (96)
    with pytest.raises(ValueError, match="embedded corpus's bytes\\): tokenize the data with the tokenizer of"):
        run(compose_config([f"model.pretrained={tmp_path / 'src'}", "trainer.accelerator=cpu",
                            "data.seq_len=32"] + QUICK, run_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="model.pretrained is loaded by the attn_hybrid strategy"):
        run(compose_config([f"model.pretrained={tmp_path / 'src'}", "strategy=lightning_ddp"] + QUICK,
                           run_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="cannot be shrunk by \\+scale=smoke"):
        run(compose_config([f"model.pretrained={tmp_path / 'src'}", "+scale=smoke"] + QUICK,
                           run_dir=str(tmp_path / "run")))
