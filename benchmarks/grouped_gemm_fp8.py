"""The routed experts' SwiGLU, forward and backward, in bf16 grouped GEMMs against torchao's float8
rowwise grouped GEMMs, at the V2-Lite cut's shapes (one GPU, sm89+).

    python benchmarks/grouped_gemm_fp8.py --out benchmarks/results/grouped_gemm_fp8_h100.json

What it answers: what fp8 experts (`ParallelPlan.fp8_experts`) take off a MoE layer, and whether
the experts' storage should change for it. The rows are the project's `grouped_swiglu` in bf16
(`torch._grouped_mm`, weights stored (E, D, F) as the model stores them); the model's fp8 path
(`FLOAT8_GROUPED_GEMM`: torchao 0.18's `_to_fp8_rowwise_then_scaled_grouped_mm` on groups padded
to 16 rows, with column-major copies of the weights made again in the backward); and torchao's
kernel on weights stored (E, F, D), where the column-major operand is a free transpose. Each row
runs compiled (`--eager` to compare without). The routing is balanced, tokens x top_k / experts
rows each (768 at micro-batch 4), because the last row calls torchao without padding.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cuda_timing import timed_ms  # noqa: E402
from lightning_attn_parallel.models.deepseek import GroupedGemm, grouped_swiglu  # noqa: E402
from lightning_attn_parallel.parallel.float8 import FLOAT8_GROUPED_GEMM  # noqa: E402


def torchao_on_stored_layout(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torchao's fp8 grouped GEMM called directly: `b_t` is already column-major, the groups
    already multiples of 16 (no padding, no copy)."""
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm as mm

    return mm(a, b_t, offs, pad_token_groups_for_grouped_mm=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens a step (micro-batch x seq)")
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1408)
    parser.add_argument("--moe-layers", type=int, default=3, help="MoE layers a step (the cut has 3)")
    parser.add_argument("--eager", action="store_true", help="run the rows without torch.compile")
    parser.add_argument("--out")
    args = parser.parse_args()
    dev, e, d, f = "cuda", args.experts, args.dim, args.hidden
    rows = args.tokens * args.top_k
    per_expert = rows // e
    if per_expert % 16:
        sys.exit(f"error: {rows} rows over {e} experts is {per_expert} each; torchao 0.18 needs a multiple of 16")
    counts = torch.full((e,), per_expert, device=dev, dtype=torch.int64)
    x = torch.randn(rows, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(rows, d, device=dev, dtype=torch.bfloat16)

    def weight(*shape):
        return (0.02 * torch.randn(*shape, device=dev)).to(torch.bfloat16).requires_grad_()

    model_layout = [weight(e, d, f), weight(e, d, f), weight(e, f, d)]  # as RoutedExperts stores them
    stored_t = [weight(e, f, d), weight(e, f, d), weight(e, d, f)]  # transposes are column-major (E, K, N)

    def step(forward):
        forward = forward if args.eager else torch.compile(forward)

        def run():
            for t in [x, *model_layout, *stored_t]:
                t.grad = None
            forward(x, counts).backward(grad_out)
        return run

    bf16 = step(lambda x, counts: grouped_swiglu(x, counts, *model_layout))
    fp8_model = step(lambda x, counts: grouped_swiglu(x, counts, *model_layout, gemm=FLOAT8_GROUPED_GEMM))
    fp8_stored = step(lambda x, counts: grouped_swiglu(x, counts, *(w.mT for w in stored_t),
                                                       gemm=GroupedGemm(torchao_on_stored_layout)))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compiled": not args.eager,
              "shape": {"rows": rows, "experts": e, "dim": d, "hidden": f, "rows_per_expert": per_expert}}
    for name, fn in (("bf16 grouped_mm", bf16),
                     ("fp8 rowwise, the model's path (padded groups, column-major copies of (E, D, F))", fp8_model),
                     ("fp8 rowwise, weights stored (E, F, D)", fp8_stored)):
        try:
            ms = timed_ms(fn, warmup=5, iters=20)
            result[name] = {"ms_per_layer": ms, "ms_per_step": ms * args.moe_layers}
        except Exception as err:  # noqa: BLE001 - report the row, keep the others
            result[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    base = result["bf16 grouped_mm"].get("ms_per_layer")
    for name, row in result.items():
        if isinstance(row, dict) and "ms_per_layer" in row and base:
            row["speedup_vs_bf16"] = base / row["ms_per_layer"]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
