"""Copy bandwidth between one GPU and pinned host memory, each way: what activation offload
(`ParallelPlan(offload_activations=True)`, torch's `save_on_cpu`) pays per saved byte.

    python benchmarks/host_copy.py --out benchmarks/results/host_copy_h200.json

Copies are issued as `save_on_cpu` issues them (non-blocking, on the compute stream), timed with
CUDA events over several GiB so that launch cost does not count.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cuda_timing import timed_ms  # the script's folder is on sys.path


def gb_per_s(copy, nbytes: int) -> float:
    return nbytes / (timed_ms(copy, warmup=1, iters=5) / 1e3) / 1e9  # warm-up: first touch of the pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    nbytes = int(args.gib * 2**30)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    result = {"device": torch.cuda.get_device_name(), "gib": args.gib,
              "gpu_to_host_gb_per_s": gb_per_s(lambda: host.copy_(gpu, non_blocking=True), nbytes),
              "host_to_gpu_gb_per_s": gb_per_s(lambda: gpu.copy_(host, non_blocking=True), nbytes)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
