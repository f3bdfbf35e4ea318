"""Packed documents on one GPU: the document-masked kernel and useful tokens/s of the 1B model.

1. Agreement: FlexAttention (the GPU path of models/document_attention.py) against SDPA with the
   explicit mask, forward and backward, GQA (1B shape) and MLA head widths (192 / 128).
2. Kernel: document-masked attention against plain causal SDPA at equal tokens, fwd + bwd.
3. Model: the 1B Llama shape, bf16, forward + backward + loss on one window of seq_len tokens of
   heavy-tailed documents (lognormal lengths, median ~ 1k tokens, longest cut at seq_len):
   - packed with masks (data=documents),
   - packed without masks (plain causal over the window: the wrong but common baseline),
   - padded, one document per window: its step costs the same as the unmasked window of the same
     shape, so its useful tokens/s is (mean document tokens per window) / (that step time).

    python benchmarks/documents_gpu.py --out benchmarks/results/documents_h200.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightning_attn_parallel.data.documents import pack_documents, packed_window  # noqa: E402
from lightning_attn_parallel.models import ModelConfig, build_model  # noqa: E402
from lightning_attn_parallel.models import document_attention  # noqa: E402
from lightning_attn_parallel.models.document_attention import (  # noqa: E402
    flex_document_attention, masked_document_attention, varlen_document_attention)
from lightning_attn_parallel.models.loss import cross_entropy_sum  # noqa: E402

LLAMA_1B = dict(family="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                ffn_dim=5632, max_seq_len=32768)


def timed(fn, steps: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def heavy_tailed_offsets(total: int, seq_len: int, seed: int = 0) -> np.ndarray:
    gen = np.random.default_rng(seed)
    lengths = np.clip(gen.lognormal(mean=np.log(1000), sigma=1.2, size=total // 200), 16, seq_len + 1)
    lengths = lengths.astype(np.int64)
    lengths = lengths[np.cumsum(lengths) <= total]
    return np.concatenate([[0], np.cumsum(lengths)])


def typical_window(packing) -> int:
    """The window holding the median number of documents (best-fit decreasing opens its first
    windows with the longest documents, so window 0 is not typical)."""
    counts = np.diff(packing.starts)
    return int(np.argsort(counts, kind="stable")[len(counts) // 2])


def agreement() -> list[dict]:
    """bf16 FlexAttention and bf16 masked SDPA, each against masked SDPA in fp32 on the same inputs."""
    rows = []
    torch.manual_seed(0)
    for name, hq, hkv, dqk, dv in (("gqa 32/4 x 64", 32, 4, 64, 64), ("mla 16 x 192/128", 16, 16, 192, 128)):
        s = 4096
        ids = torch.as_tensor(np.repeat(np.arange(8), [900, 5, 1, 700, 1200, 190, 1000, 100]))[None].cuda()
        shapes = ((1, hq, s, dqk), (1, hkv, s, dqk), (1, hkv, s, dv))
        leaves = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for shape in shapes]
        grad = torch.randn(1, hq, s, dv, device="cuda", dtype=torch.bfloat16)

        def run(fn, dtype):
            q, k, v = (t.to(dtype).requires_grad_() for t in leaves)
            out = fn(q, k, v, ids, dqk ** -0.5)
            return [out, *torch.autograd.grad(out, (q, k, v), grad.to(dtype))]

        reference = run(masked_document_attention, torch.float32)
        for label, fn in (("flex bf16", flex_document_attention), ("varlen bf16", varlen_document_attention),
                          ("masked sdpa bf16", masked_document_attention)):
            try:
                got = run(fn, torch.bfloat16)
            except Exception as err:  # noqa: BLE001 - report, keep measuring the rest
                rows.append({"case": name, "path": label, "error": f"{type(err).__name__}: {str(err)[:200]}"})
                print("agreement", name, label, "FAILED", str(err)[:200], flush=True)
                continue
            err = {n: float((a.double() - b.double()).norm() / b.double().norm())
                   for n, a, b in zip(("out", "dq", "dk", "dv"), got, reference)}
            rows.append({"case": name, "path": label, **err})
            print("agreement", name, label, "vs fp32:", {k: f"{v:.2e}" for k, v in err.items()}, flush=True)
    return rows


def kernel_speed(seq_lens) -> list[dict]:
    rows = []
    for s in seq_lens:
        offsets = heavy_tailed_offsets(4 * s, s, seed=s)
        packing = pack_documents(offsets, s)
        ids = packed_window(np.zeros(offsets[-1], dtype=np.int64), packing, typical_window(packing),
                            0)["document_ids"][None].cuda()
        q = torch.randn(1, 32, s, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 4, s, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 4, s, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        kernels = {"flex": lambda: flex_document_attention(q, k, v, ids),
                   "varlen": lambda: varlen_document_attention(q, k, v, ids),
                   "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
        docs = int((ids[0].unique() >= 0).sum())
        row = {"seq_len": s, "documents": docs}
        for name, fn in kernels.items():
            try:
                row[f"{name}_ms"] = timed(lambda: fn().sum().backward(), 10, 3) * 1e3
            except Exception as err:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        print("kernel", row, flush=True)
    return rows


def model_speed(seq_lens) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    model = build_model(ModelConfig(**LLAMA_1B)).cuda().to(torch.bfloat16)
    for s in seq_lens:
        offsets = heavy_tailed_offsets(8 * s, s, seed=s)
        tokens = np.random.default_rng(0).integers(0, 32000, size=int(offsets[-1]))
        packing = pack_documents(offsets, s)
        window = {k: t[None].cuda() for k, t in packed_window(tokens, packing, typical_window(packing), 0).items()}
        useful = int((window["labels"] != -100).sum())

        def step(document_ids, positions):
            hidden = model(window["input_ids"], positions, document_ids)
            loss, count = cross_entropy_sum(hidden, model.output, window["labels"], 8192)
            (loss / count).backward()

        times = {}
        for path in ("flex", "varlen"):
            document_attention.GPU_PATHS = (path,)
            times[path] = timed(lambda: step(window["document_ids"], window["positions"]))
            if path in document_attention._FAILED:  # it fell back to the explicit mask: not this path
                del times[path]
                print("model", s, path, "FAILED (fell back)", flush=True)
        t_plain = timed(lambda: step(None, None))
        t_masked = min(times.values())
        padded = pack_documents(offsets, s, pack=False)
        per_padded_window = float(padded.length.sum()) / padded.num_windows
        row = {"seq_len": s, "useful_tokens_per_window": useful, "documents_in_window":
               int(window["document_ids"].max()) + 1, **{f"{p}_step_s": t for p, t in times.items()},
               "unmasked_step_s": t_plain,
               "packing_efficiency": packing.stats(offsets)["packing_efficiency"],
               "packed_masked_tok_s": useful / t_masked, "packed_unmasked_tok_s": useful / t_plain,
               "padded_tok_s": per_padded_window / t_plain, "padded_useful_per_window": per_padded_window}
        row["masked_over_padded"] = row["packed_masked_tok_s"] / row["padded_tok_s"]
        row["masked_over_unmasked"] = row["packed_masked_tok_s"] / row["packed_unmasked_tok_s"]
        rows.append(row)
        print("model", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "agreement": agreement(), "kernel": kernel_speed(args.seq_lens),
              "model": model_speed(args.seq_lens)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
