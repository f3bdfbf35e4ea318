"""What one block of the 1B Llama runs under fp8 tensorwise, with and without fused projections:
the GEMMs and the casts to fp8 in its compiled forward and backward graphs (no GPU needed).

    python benchmarks/fp8_graph_ops.py --out benchmarks/results/fp8_graph_ops_cpu.json

The graphs are the ones AOTAutograd hands to inductor for the block under a full-graph compile,
counted by op; torchao's float8 runs emulated on the CPU, which casts and scales as on a GPU and
only does the GEMMs in higher precision. Counts are per block per step and do not depend on the
batch, so short sequences are used; the bytes written as fp8 grow linearly with the tokens
(activations and gradients) plus a constant (weights), so two lengths give them exactly at the
suite's 16,384 tokens a step (seq 2048, micro-batch 8). This answers what fusion changes in the step's work; what that
is worth in time is a GPU measurement (`python benchmarks/bench.py kernels_fp8`).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_attn_parallel.models import ModelConfig, build_model  # noqa: E402
from lightning_attn_parallel.models.fused_projections import projection_groups, set_fused_projections  # noqa: E402
from lightning_attn_parallel.parallel.float8 import apply_float8  # noqa: E402

# the 1B Llama of suites.yaml, one block
BLOCK = dict(vocab_size=32000, d_model=2048, n_layers=1, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=64)
GEMMS = ("aten.mm.default", "aten._scaled_mm.default", "aten.addmm.default", "aten.bmm.default")


def count_ops(gm: torch.fx.GraphModule) -> Counter:
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if str(node.target) in GEMMS:
            counts["GEMMs"] += 1
        if "float8" in str(node.kwargs.get("dtype", "")):
            counts["casts to fp8"] += 1
            counts["fp8 bytes"] += node.meta["val"].numel()
    return counts


def block_graph_ops(fuse: bool, seq: int = 16) -> dict[str, dict[str, int]]:
    """Op counts of one block's forward and backward graphs under fp8 tensorwise."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}

    def recorder(which: str):
        def compile_graph(gm, _example_inputs):
            graphs[which] += count_ops(gm)
            return make_boxed_func(gm.forward)
        return compile_graph

    torch._dynamo.reset()
    model = build_model(ModelConfig(**BLOCK))
    apply_float8(model, "tensorwise", fsdp_all_gather=False, emulate=True,
                 fused_groups=list(projection_groups(model)) if fuse else ())
    set_fused_projections(model, fuse)
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    block = torch.compile(model.blocks[0], backend=backend, fullgraph=True)
    x = torch.randn(1, seq, BLOCK["d_model"], requires_grad=True)
    block(x, torch.arange(seq)).sum().backward()
    return {which: dict(sorted(c.items())) for which, c in graphs.items()}


def at_tokens(short: dict, longer: dict, short_len: int, long_len: int, tokens: int) -> dict:
    """The counts at `tokens`, with "fp8 bytes" (as MB) extrapolated along its exact line."""
    out = {}
    for which in short:
        counts = dict(short[which])
        per_token = (longer[which]["fp8 bytes"] - counts["fp8 bytes"]) / (long_len - short_len)
        fixed = counts.pop("fp8 bytes") - per_token * short_len
        counts["MB written as fp8"] = round((fixed + per_token * tokens) / 1e6, 1)
        out[which] = counts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tokens = 16384
    result = {"model": "1B Llama block (d 2048, 32 q heads, 4 kv heads, ffn 5632)", "fp8": "tensorwise",
              "tokens": tokens}
    for label, fuse in (("separate projections", False), ("fused projections", True)):
        result[label] = at_tokens(block_graph_ops(fuse, 16), block_graph_ops(fuse, 32), 16, 32, tokens)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
