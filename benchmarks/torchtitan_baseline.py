"""TorchTitan's Llama and DeepSeek-V3 on the project's shapes, in TorchTitan's own set-up, timed like bench.py's rows.

Run under torchrun (bench.py does, for rows with `strategy: torchtitan` or `torchtitan_deepseek_v3`):

    torchrun --standalone --nproc-per-node=N benchmarks/torchtitan_baseline.py --row '<Config JSON>' --out r.json

TorchTitan 0.2.2 (0.3.0 needs a newer torch than 2.11). Its model and its own parallelize
function (`parallelize_llama`, `parallelize_deepseekv3`) apply per-block compile, FSDP2 over the
data-parallel ranks and, for DeepSeek-V3, expert parallelism over `plan.ep` ranks. On one GPU
TorchTitan trains under autocast, as its trainer does; a row with `precision: bf16-true` casts the
parameters (not the buffers: the RoPE table is complex) to bf16 and trains without autocast, the
same precision as the project's bf16-true rows (TorchTitan has no such switch of its own). A row
with `plan: {fp8_experts: true}` runs DeepSeek-V3's routed experts through torchao's fp8 rowwise
grouped GEMMs as TorchTitan's `quantize.grouped_mm.float8` converter does (token groups aligned to
16, the experts' weights wrapped by torchao's `quantize_`); the converter of 0.2.2 names the
config class torchao 0.18 renamed, so the row calls torchao itself. The loss is TorchTitan's compiled
cross-entropy on the full logits; AdamW fused. The loop is a plain PyTorch loop (TorchTitan's
trainer needs its own data pipeline and tokenizer), with the same synthetic tokens and timing
window as bench.py. DeepSeek-V3's routing-bias update (an optimizer hook in TorchTitan's trainer)
is left out, as bench.py's attn_hybrid rows leave out nothing comparable on the timed path.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import torch.distributed as dist


def llama_args(model: dict, seq_len: int):
    """TorchTitan's TransformerModelArgs for the project's Llama shape (FFN width given exactly)."""
    from torchtitan.models.llama3 import TransformerModelArgs

    dim, hidden = model["d_model"], model["ffn_dim"]
    # TorchTitan derives the FFN width as multiple_of * ceil(multiplier * int(8 * dim / 3) / multiple_of):
    # a multiplier of hidden / int(8 * dim / 3) with multiple_of 256 gives back `hidden` for the
    # project's shapes (both are multiples of 256).
    multiplier = hidden / int(8 * dim / 3)
    return TransformerModelArgs(dim=dim, n_layers=model["n_layers"], n_heads=model["n_heads"],
                                n_kv_heads=model.get("n_kv_heads"), vocab_size=model["vocab_size"],
                                multiple_of=256, ffn_dim_multiplier=multiplier,
                                norm_eps=model.get("norm_eps", 1e-5), rope_theta=model.get("rope_theta", 10000.0),
                                max_seq_len=seq_len)


def deepseek_args(model: dict, seq_len: int, row_grouped_gemm: bool = True):
    """TorchTitan's DeepSeekV3ModelArgs for the project's DeepSeek shape (V2 softmax routing, as
    TorchTitan's own "16B" V2-Lite entry; SDPA with a causal mask, as the project's rows)."""
    from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs
    from torchtitan.models.moe import MoEArgs

    moe = MoEArgs(num_experts=model["n_routed_experts"], num_shared_experts=model.get("n_shared_experts", 0),
                  top_k=model["moe_top_k"], score_func=model.get("score_func", "softmax"),
                  route_norm=bool(model.get("norm_topk_prob", False)),
                  route_scale=model.get("routed_scaling_factor", 1.0), score_before_experts=False,
                  use_grouped_mm=bool(row_grouped_gemm))
    return DeepSeekV3ModelArgs(vocab_size=model["vocab_size"], dim=model["d_model"], inter_dim=model["ffn_dim"],
                               moe_inter_dim=model["moe_ffn_dim"], n_layers=model["n_layers"],
                               n_dense_layers=model.get("first_k_dense_replace", 1), n_heads=model["n_heads"],
                               norm_eps=model.get("norm_eps", 1e-5), moe_args=moe,
                               q_lora_rank=model.get("q_lora_rank") or 0, kv_lora_rank=model["kv_lora_rank"],
                               qk_nope_head_dim=model["qk_nope_head_dim"], qk_rope_head_dim=model["qk_rope_head_dim"],
                               v_head_dim=model["v_head_dim"], attn_type="sdpa", attn_mask_type="causal",
                               max_seq_len=seq_len, rope_theta=model.get("rope_theta", 10000.0))


def build(row: dict, dims, job):
    """(model parallelized by TorchTitan's own function, vocabulary size) for the row's family."""
    seq_len = row["seq_len"]
    if row["strategy"] == "torchtitan_deepseek_v3":
        from torchtitan.models.deepseek_v3 import DeepSeekV3Model, parallelize_deepseekv3

        args = deepseek_args(row["model"], seq_len, row.get("grouped_gemm", True))
        args.update_from_config(job)
        model_cls, parallelize = DeepSeekV3Model, parallelize_deepseekv3
    else:
        from torchtitan.models.llama3 import Transformer, parallelize_llama

        args, model_cls, parallelize = llama_args(row["model"], seq_len), Transformer, parallelize_llama
    with torch.device("meta"):
        model = model_cls(args)
    if row.get("plan", {}).get("fp8_experts"):
        fp8_experts(model)
    return parallelize(model, dims, job), args.vocab_size


def fp8_experts(model) -> None:
    """DeepSeek-V3's routed experts (the `moe.experts` modules, not the shared experts) in
    torchao's fp8 rowwise grouped GEMMs, as TorchTitan's grouped-mm float8 converter sets them up."""
    from torchao.prototype.moe_training.config import Float8TrainingOpConfig
    from torchao.quantization.quant_api import quantize_
    from torchtitan.models.moe.utils import set_token_group_alignment_size_m

    set_token_group_alignment_size_m(16)
    quantize_(model, config=Float8TrainingOpConfig(), filter_fn=lambda module, fqn: fqn.endswith("moe.experts"))


def run(row: dict) -> dict:
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.config.job_config import JobConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import maybe_enable_amp

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    seq_len, micro_batch = row["seq_len"], row["micro_batch"]
    job = JobConfig()
    job.training.seq_len = seq_len
    job.training.local_batch_size = micro_batch
    job.compile.enable = bool(row.get("compile", True))
    job.compile.components = ["model", "loss"]
    job.activation_checkpoint.mode = row.get("checkpointing", "none") if row.get("checkpointing") in ("full", "selective") else "none"
    ep = int(row.get("plan", {}).get("ep", 1))
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=ep, etp=1, world_size=world)
    dims.build_mesh()
    model, vocab_size = build(row, dims, job)
    model.to_empty(device="cuda")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    bf16_weights = row.get("precision") == "bf16-true"
    if bf16_weights:
        wrapper = ()  # torchao's fp8 weight wrapper, where the row's experts have it
        if row.get("plan", {}).get("fp8_experts"):
            from torchao.prototype.moe_training.tensor import TrainingWeightWrapperBaseTensor as wrapper
        with torch.no_grad():
            for param in model.parameters():
                if isinstance(param.data, wrapper):
                    # torchao's fp8 wrapper: assigning .data would cast the wrapper, not the
                    # tensor it wraps (the fp8 GEMMs would read fp32 weights)
                    torch.utils.swap_tensors(param, torch.nn.Parameter(param.data.to(torch.bfloat16)))
                else:
                    param.data = param.data.to(torch.bfloat16)
    model.train()
    loss_fn = build_cross_entropy_loss(job)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    amp = None if bf16_weights else maybe_enable_amp(dims, job.training.mixed_precision_param, "cuda")
    steps, warmup = row["steps"], row["warmup"]
    rank = dist.get_rank()
    start = static = 0.0
    profiler = None
    if row.get("profile"):
        from kernel_profile import StepProfiler

        profiler = StepProfiler()
    for step in range(steps):
        g = torch.Generator().manual_seed(step * world + rank)
        x = torch.randint(vocab_size, (micro_batch, seq_len + 1), generator=g).cuda(non_blocking=True)
        if step == warmup:
            torch.cuda.synchronize()
            static = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if profiler is not None:
                profiler.begin()
        with amp if amp is not None else contextlib.nullcontext():
            logits = model(x[:, :-1])
            loss = loss_fn(logits, x[:, 1:]) / (micro_batch * seq_len)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    profile = profiler.finish(steps - warmup) if profiler is not None else None
    tokens = (steps - warmup) * micro_batch * seq_len * world
    import torchtitan

    result = {"tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / world,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "static_gib": static / 2**30,
              "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
              "device": torch.cuda.get_device_name(), "torchtitan": getattr(torchtitan, "__version__", "0.2.2"),
              "final_loss": float(loss)}
    if profile is not None:
        result.update(profile)
    dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", required=True, help="bench.py Config as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = run(json.loads(args.row))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
