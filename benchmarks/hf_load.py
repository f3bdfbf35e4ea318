"""Load time and peak host memory of a Hugging Face folder: this package's loader vs transformers.

    python benchmarks/hf_load.py --folder /tmp/llama8b_hf          # writes the folder first if absent
    python benchmarks/hf_load.py --folder /tmp/tiny_hf --shape tiny --device cpu   # a quick check

Writes a random-init Llama-3-8B-shaped folder with transformers' own `save_pretrained` (bf16,
5 GB shards), then times, each in a fresh process so that peak RSS is the method's own:
- `fsdp2`: the project's model built on the meta device, FSDP2-sharded over a one-rank mesh,
  materialised on the device, then filled by pretrained.load_pretrained (each rank reads only
  its slices from the memory-mapped files);
- `transformers`: AutoModelForCausalLM.from_pretrained(folder, dtype=bf16, device_map=device)
  (without accelerate installed: loaded on the host, then moved).
Prints one JSON line per method (seconds, peak host RSS in GiB, bytes read) and writes them to
benchmarks/results/hf_load_SHAPE_DEVICE.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # Llama 3 8B (recipes/llama3_8b.yaml)
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0),
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_folder(folder: Path, shape: str) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")


def run_fsdp2(folder: Path, device: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lightning_attn_parallel.models import build_model
    from lightning_attn_parallel.models.hf import Checkpoint
    from lightning_attn_parallel.models.materialize import materialize, reset_buffers
    from lightning_attn_parallel.pretrained import load_pretrained

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    start = time.perf_counter()
    cfg = Checkpoint(folder).model_config(max_seq_len=8192)
    with torch.device("meta"):
        model = build_model(cfg)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    materialize(model, device)
    model.to(torch.bfloat16)
    reset_buffers(model)  # the RoPE tables again, built in bf16
    ckpt = load_pretrained(model, folder)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    dist.destroy_process_group()
    return dict(method="fsdp2", seconds=seconds, peak_rss_gib=peak_rss_gib(), bytes_read=ckpt.bytes_read)


def run_transformers(folder: Path, device: str) -> dict:
    import torch
    import transformers

    start = time.perf_counter()
    try:  # device_map (straight to the device) needs accelerate; else load on the host, then move
        import accelerate  # noqa: F401

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
    except ImportError:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    return dict(method="transformers", seconds=seconds, peak_rss_gib=peak_rss_gib())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--method", choices=["fsdp2", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # a child process: one method, one JSON line
        fn = run_fsdp2 if args.method == "fsdp2" else run_transformers
        print(json.dumps(fn(args.folder, args.device) | dict(device=args.device, shape=args.shape)))
        return
    if not (args.folder / "config.json").exists():
        write_folder(args.folder, args.shape)
    folder_gib = sum(p.stat().st_size for p in args.folder.glob("*.safetensors")) / 2**30
    results = []
    for method in ("fsdp2", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--folder", str(args.folder), "--shape", args.shape,
                              "--device", args.device, "--method", method],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        result = json.loads(out.stdout.strip().splitlines()[-1]) | dict(folder_gib=folder_gib)
        print(json.dumps(result))
        results.append(result)
    target = ROOT / "benchmarks" / "results" / f"hf_load_{args.shape}_{args.device}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
