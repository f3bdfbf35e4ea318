"""The master-weights optimizer step alone, on one GPU: the fused update against what it replaces.

    python benchmarks/master_step.py --out benchmarks/results/master_step_micro_h100.json

Per parameter tensor, "unfused" is what a step under master weights did before the fused step:
the bf16 gradient cast into a new fp32 `master.grad`, torch's fused AdamW over the fp32 masters,
and the refresh of the bf16 compute copy. "fused" is `parallel.master_adamw.step_masters`, one
compiled kernel per tensor reading the bf16 gradient and writing master, moments and copy,
launched from one compiled call per group of same-shape tensors (the calls, the graphs and the
first step's compile time are reported). The
tensors have the shapes of the 1B Llama of `benchmarks/suites.yaml` (or of the V2-Lite cut's
experts with --moe), so launch counts are a real model's. Milliseconds per step, CUDA events.

    python benchmarks/master_step.py --cpu-compile

times the first steps' compile alone on the CPU, from an empty inductor cache: the same tensor
layout at 1/32 of the widths (the graphs have symbolic sizes, so sizes do not change them), with
the step compiled as on a GPU (on the CPU the product runs it eagerly).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cuda_timing import timed_ms  # noqa: E402
from lightning_attn_parallel.parallel import master_adamw  # noqa: E402
from lightning_attn_parallel.parallel.master_adamw import groups, step_masters  # noqa: E402


def shapes(moe: bool, divisor: int = 1) -> list[tuple[int, ...]]:
    d, f, v = 2048 // divisor, 5632 // divisor, 32000 // divisor
    if moe:  # the V2-Lite cut's 3 MoE layers: 64 routed experts' stacked w1, w3, w2
        e = 1408 // divisor
        return [(64, d, e), (64, d, e), (64, e, d)] * 3 + [(102400 // divisor, d)] * 2
    kv = 256 // divisor
    layer = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f), (d,), (d,)]
    return layer * 22 + [(v, d), (v, d), (d,)]


class Model:
    """Fp32 masters of `shapes`, their bf16 compute copies and bf16 gradients, and fused AdamW."""

    def __init__(self, moe: bool, device: str, divisor: int = 1) -> None:
        self.masters = [torch.nn.Parameter(0.02 * torch.randn(s, device=device)) for s in shapes(moe, divisor)]
        self.copies = [m.detach().to(torch.bfloat16) for m in self.masters]
        self.grads = [torch.randn_like(c) for c in self.copies]
        self.opt = torch.optim.AdamW(self.masters, lr=1e-4, weight_decay=0.1, fused=True)

    def fused(self) -> None:
        step_masters(self.opt, {id(m): (m, None, g, c) for m, g, c in zip(self.masters, self.grads, self.copies)},
                     None)

    def unfused(self) -> None:
        for m, g in zip(self.masters, self.grads):
            m.grad = g.to(torch.float32)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        torch._foreach_copy_(self.copies, [m.detach() for m in self.masters])


def cpu_compile(moe: bool) -> dict:
    """Seconds of each of the first three fused steps on the CPU with the step compiled, from an
    empty inductor cache, and the graphs compiled by then."""
    master_adamw._compiles = lambda device: True  # what a GPU does; the product's CPU path is eager
    model = Model(moe, "cpu", divisor=32)
    result = {"device": "cpu", "torch": torch.__version__, "tensors": len(model.masters), "steps": []}
    for _ in range(3):
        start = time.perf_counter()
        model.fused()
        result["steps"].append({"s": time.perf_counter() - start,
                                "graphs": counters["stats"]["unique_graphs"]})
    return result


def gpu_steps(moe: bool) -> dict:
    """Milliseconds per step of both paths on the GPU, after the fused step's first (compiling) one."""
    model = Model(moe, "cuda")
    n = sum(m.numel() for m in model.masters)
    calls = len(groups(list(zip(model.masters, model.grads, model.copies))))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parameters": n,
              "tensors": len(model.masters), "compiled_calls": calls}
    start = time.perf_counter()
    model.fused()  # the first step compiles its graphs
    torch.cuda.synchronize()
    result["first_fused_step_s"] = time.perf_counter() - start
    result["graphs"] = counters["stats"]["unique_graphs"]
    unfused, fused = "unfused: cast + torch fused AdamW + refresh", "fused master step"
    for name, fn in ((unfused, model.unfused), (fused, model.fused)):
        result[name] = {"ms_per_step": timed_ms(fn)}
    base = result[unfused]["ms_per_step"]
    result[fused]["speedup"] = base / result[fused]["ms_per_step"]
    # bytes a step at HBM speed: 40 per parameter unfused, 28 fused (parallel/master_adamw.py)
    result[unfused]["gb_per_s"] = 40 * n / base / 1e6
    result[fused]["gb_per_s"] = 28 * n / result[fused]["ms_per_step"] / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", action="store_true", help="the V2-Lite cut's expert and embedding tensors")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="time the first steps' compile on the CPU, from an empty cache")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.cpu_compile:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # before the first compile
    result = cpu_compile(args.moe) if args.cpu_compile else gpu_steps(args.moe)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))

if __name__ == "__main__":
    main()
