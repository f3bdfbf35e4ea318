"""What one block of the 1B Llama runs and keeps for its backward, with and without fused
projections, in bf16 and under fp8 tensorwise: counted in its compiled graphs (no GPU needed).

    python benchmarks/fused_projection_graphs.py --out benchmarks/results/fused_projection_graphs_cpu.json

The graphs are the ones AOTAutograd hands to inductor for the block under a full-graph compile,
split into forward and backward by the same min-cut partitioner inductor uses, so "saved for the
backward" is what a compiled step holds per block between its forward and backward (parameters
left out: they are held anyway). torchao's float8 runs emulated on the CPU, which casts and scales
as on a GPU and only does the GEMMs in higher precision. The counts do not depend on the batch;
the bytes grow linearly with the tokens (activations, gradients) plus a constant (weights), so two
short sequences give them exactly at the suite's 16,384 tokens a step (seq 2048, micro-batch 8).
What the differences are worth in time is a GPU measurement (`python benchmarks/bench.py
kernels_fp8`, and `kernels` for bf16).
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
TOKENS = 16384


def _tensor_bytes(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def count_ops(gm: torch.fx.GraphModule) -> Counter:
    """GEMMs, casts to fp8 and the bytes they write."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if str(node.target) in GEMMS:
            counts["GEMMs"] += 1
        if "float8" in str(node.kwargs.get("dtype", "")):
            counts["casts to fp8"] += 1
            counts["bytes written as fp8"] += _tensor_bytes(node)
    return counts


def _aliases_an_input(node: torch.fx.Node) -> bool:
    """A graph input (parameter or the block's input), or a view of one: it holds no memory of its own."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.is_view:
        node = node.args[0]
    return node.op == "placeholder"


def kept_for_backward(forward: torch.fx.GraphModule, user_outputs: int = 1) -> list[torch.fx.Node]:
    """The tensors the forward graph hands to the backward beyond its outputs, inputs and their
    views (parameters, transposed weights) left out: they are held anyway."""
    (outputs,) = [n.args[0] for n in forward.graph.nodes if n.op == "output"]
    return [n for n in outputs[user_outputs:] if isinstance(n, torch.fx.Node) and not _aliases_an_input(n)
            and isinstance(n.meta.get("val"), torch.Tensor)]


def saved_bytes(forward: torch.fx.GraphModule, user_outputs: int = 1) -> int:
    """Bytes of `kept_for_backward`."""
    return sum(_tensor_bytes(n) for n in kept_for_backward(forward, user_outputs))


def block_graphs(fuse: bool, fp8: bool, seq: int, block: dict = BLOCK) -> dict[str, Counter]:
    """Op counts and saved bytes of one bf16 block's forward and backward graphs (`block`: the
    model's fields, one layer)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}

    def recorder(which: str):
        def compile_graph(gm, _example_inputs):
            graphs[which] += count_ops(gm)
            if which == "forward":
                graphs[which]["bytes saved for the backward"] += saved_bytes(gm)
            return make_boxed_func(gm.forward)
        return compile_graph

    torch._dynamo.reset()
    model = build_model(ModelConfig(**block)).to(torch.bfloat16)
    if fp8:
        apply_float8(model, "tensorwise", fsdp_all_gather=False, emulate=True,
                     fused_groups=list(projection_groups(model)) if fuse else ())
    set_fused_projections(model, fuse)
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(model.blocks[0], backend=backend, fullgraph=True)
    x = torch.randn(1, seq, block["d_model"], dtype=torch.bfloat16, requires_grad=True)
    compiled(x, torch.arange(seq)).sum().backward()
    return graphs


def at_tokens(fuse: bool, fp8: bool, short: int = 16, longer: int = 32) -> dict[str, dict]:
    """The counts, with every byte figure (as MB) at TOKENS along its exact line in the tokens."""
    a, b = block_graphs(fuse, fp8, short), block_graphs(fuse, fp8, longer)
    out = {}
    for which in a:
        row = {}
        for key, value in sorted(a[which].items()):
            if key.startswith("bytes"):
                per_token = (b[which][key] - value) / (longer - short)
                value = round((value + per_token * (TOKENS - short)) / 1e6, 1)
                key = "MB" + key[len("bytes"):]
            row[key] = value
        out[which] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    result = {"model": "1B Llama block (d 2048, 32 q heads, 4 kv heads, ffn 5632), bf16 weights",
              "tokens": TOKENS, "partitioner": "min-cut (as inductor)"}
    for precision, fp8 in (("bf16", False), ("fp8 tensorwise", True)):
        for label, fuse in (("separate projections", False), ("fused projections", True)):
            result[f"{precision}, {label}"] = at_tokens(fuse, fp8)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
