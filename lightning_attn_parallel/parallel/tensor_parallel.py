"""Tensor parallelism of attention heads and dense MLPs through DTensor `parallelize_module`.

Layout (Megatron-style, written with DTensor styles):
- GQA attention: wq/wk/wv column-parallel (each rank owns n_heads/tp query heads and the KV
  heads they read), wo row-parallel. The attention kernel receives plain local tensors of the
  local heads, so any kernel (local SDPA, context-parallel) works unchanged.
- SwiGLU: w1/w3 column-parallel, w2 row-parallel.
- Token embedding: row-parallel over the vocabulary (exact: each rank looks up the ids it owns
  and the partial rows are summed). LM head: column-parallel over the vocabulary; it returns
  logits as a DTensor sharded on the vocabulary, which the model's `loss_kernel` slot
  (VocabParallelLoss, chunked or not) reduces without ever gathering them, so each rank holds 1/tp of the logits and of
  the head. `.full_tensor()` gives whole logits to other callers. With tied embeddings both stay
  replicated so they remain one tensor.
- Norms: replicated; with `sequence_parallel=True` the blocks' norms run on sequence shards
  (`SequenceParallel`) and the residual stream between blocks is sharded along the sequence;
  it is gathered before the final norm.

Whatever the mode, the model's output (final hidden states) is a plain tensor of the whole
sequence, identical on every TP rank.

A pipeline stage (parallel/pipeline_stages.py) holds some blocks, and the embedding or the
final norm and head only on the first or last stage (None elsewhere): TP splits what it holds,
and under sequence parallelism the blocks' plain sequence shards are what crosses the stages.

- MLA attention: split by heads (wq or wq_b and wkv_b column-parallel, wo row-parallel); the
  latent down-projections and norms stay whole on every rank.

Modules the plan does not know are handled through a registry keyed by module class
(`register_tensor_parallel_handler`); a class without a handler (e.g. an MoE ffn, whose tokens
expert parallelism splits instead) is left replicated: it runs on the full sequence on every TP
rank, with its input gathered and its output re-sharded when sequence parallelism is on.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ..models.deepseek import MultiHeadLatentAttention
from ..models.layers import SwiGLU
from ..models.llama import GroupedQueryAttention
from ..plan import divisors
from .vocab_parallel_loss import VocabParallelLoss

TensorParallelHandler = Callable[[nn.Module, DeviceMesh, bool], None]
"""handler(slot_module, tp_mesh, sequence_parallel) parallelizes a block's `attention` or `ffn`.

Contract for the slot's first positional input and its output:
- sequence_parallel=False: input and output are plain (B, S, D) tensors of the full sequence,
  identical on every TP rank;
- sequence_parallel=True: the input is a DTensor sharded on dim 1 (the sequence) over tp_mesh;
  the output must be a plain tensor of this rank's sequence shard (B, S/tp, D).
"""

_HANDLERS: dict[type, TensorParallelHandler] = {}


def register_tensor_parallel_handler(module_cls: type, handler: TensorParallelHandler) -> None:
    """Teach `apply_tensor_parallel` how to split a block's attention or ffn of `module_cls`.

    Lookup follows the class's MRO, so a subclass inherits its parent's handler.
    """
    _HANDLERS[module_cls] = handler


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh,
                          sequence_parallel: bool = False) -> nn.Module:
    """Split `model` (the block protocol: `tok_embeddings`, `blocks`, `norm`, `output`) over tp_mesh.

    Apply before activation checkpointing and data parallelism (FSDP2 composes with the DTensor
    parameters this creates when both meshes come from one parent mesh). All ranks must hold
    identical weights beforehand (same seed, or a loaded checkpoint).

    Gradients: every DTensor parameter's gradient is a DTensor of the parameter's placements
    after each backward (a hook sums the partial gradients of replicated ones, such as
    sequence-parallel norms and replicated KV projections). Parameters left as plain tensors only
    ever meet replicated activations, so their gradients come out identical on every TP rank:
    the caller needs no reduction over tp, only its usual data-parallel one.
    """
    tp = tp_mesh.size()
    if tp == 1:
        return model
    _check_heads(model, tp)
    _parallelize_embedding(model, tp_mesh, sequence_parallel)
    for block in model.blocks:
        for norm_name, slot_name in (("attention_norm", "attention"), ("ffn_norm", "ffn")):
            if sequence_parallel:
                parallelize_module(getattr(block, norm_name), tp_mesh, SequenceParallel())
            slot = getattr(block, slot_name)
            _handler_for(slot)(slot, tp_mesh, sequence_parallel)
    if sequence_parallel:
        # Gather the sequence before the final norm rather than after it: the model's output
        # is then a fresh tensor rather than a view of a DTensor's local shard (FSDP warns
        # about views), for the price of one norm over the whole sequence. A pipeline stage
        # without the norm (parallel/pipeline_stages.py) passes its sequence shard on.
        if model.norm is not None:
            _on_first_arg(model.norm, lambda x: _gather_sequence(x, tp_mesh))
        model.register_forward_pre_hook(_sequence_length_check(tp), with_kwargs=True)
    _match_grad_placements(model)
    return model


# ---------------------------------------------------------------------------- validation
def _check_heads(model: nn.Module, tp: int) -> None:
    """Fail before touching the model when a head count cannot be split tp ways."""
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            n_heads = module.wo.in_features // module.v_dim
            if n_heads % tp:
                raise ValueError(f"tensor parallelism tp={tp} does not divide the MLA n_heads="
                                 f"{n_heads}: choose tp among {divisors(n_heads)}")
        if isinstance(module, GroupedQueryAttention):
            n_heads, n_kv = _head_counts(module)
            if n_heads % tp:
                raise ValueError(
                    f"tensor parallelism tp={tp} does not divide n_heads={n_heads}: choose tp "
                    f"among {divisors(n_heads)}")
            if n_kv % tp and tp % n_kv:
                raise ValueError(
                    f"tensor parallelism tp={tp} with n_kv_heads={n_kv}: tp must divide "
                    f"n_kv_heads (KV heads sharded) or be a multiple of it (KV heads replicated); "
                    f"choose tp among {[d for d in divisors(n_heads) if n_kv % d == 0 or d % n_kv == 0]}")


def _head_counts(attn: GroupedQueryAttention) -> tuple[int, int]:
    return attn.wq.out_features // attn.head_dim, attn.wk.out_features // attn.head_dim


def _sequence_length_check(tp: int) -> Callable:
    """Sequence parallelism keeps equal shards per rank: the length must divide by tp."""

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seq_len = (args[0] if args else kwargs["tokens"]).shape[1]
        if seq_len % tp:
            raise ValueError(f"sequence parallelism needs the sequence length ({seq_len}) to be a "
                             f"multiple of tp={tp}: pad or crop the batch, or set "
                             "sequence_parallel=False")

    return check


# ---------------------------------------------------------------------------- handlers
def _handler_for(module: nn.Module) -> TensorParallelHandler:
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return _replicate_slot


def _attention_handler(attn: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    tp = mesh.size()
    n_heads, n_kv = _head_counts(attn)
    if n_kv % tp == 0:
        kv_style: ParallelStyle = ColwiseParallel()
    else:  # tp is a multiple of n_kv: every rank's query heads read exactly one KV head
        kv_head = mesh.get_local_rank() * (n_heads // tp) // (n_heads // n_kv)
        kv_style = _SelectKVHead(kv_head * attn.head_dim, (kv_head + 1) * attn.head_dim)
    out_layout = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(attn, mesh, {
        "wq": ColwiseParallel(), "wk": kv_style, "wv": kv_style,
        "wo": RowwiseParallel(output_layouts=out_layout),
    })
    _share_replicated_input(attn, mesh)


def _mlp_handler(mlp: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    out_layout = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(mlp, mesh, {
        "w1": ColwiseParallel(), "w3": ColwiseParallel(),
        "w2": RowwiseParallel(output_layouts=out_layout),
    })
    _share_replicated_input(mlp, mesh)


def _replicate_slot(module: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Default for unknown modules: run them whole on every TP rank."""
    if sequence_parallel:
        _on_first_arg(module, lambda x: _as_full_local(x, mesh))
        module.register_forward_hook(lambda mod, args, out: _keep_sequence_shard(out, mesh))


def _share_replicated_input(module: nn.Module, mesh: DeviceMesh) -> None:
    """Give the slot's column-parallel projections one shared replicated DTensor input.

    Sharing it means the input gradient is reduced once (one all-reduce, or one reduce-scatter
    under sequence parallelism) instead of once per projection.
    """
    _on_first_arg(module, lambda x: _as_replicated(x, mesh))


def _mla_handler(attn: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Multi-head latent attention split by heads, Megatron-style.

    The per-head projections (wq or wq_b, wkv_b) are column-parallel and wo row-parallel; the
    down-projections to the latents (wq_a, wkv_a) and the latent norms stay whole, computed on
    every TP rank. Gradients: a column-parallel projection all-reduces its input's gradient, so
    the latents, their norms and down-projections receive the full gradient, identical on every
    rank, and need no reduction. The one exception is the decoupled RoPE key, which leaves wkv_a
    straight for this rank's heads: its gradient columns are all-reduced over tp explicitly.
    """
    per_head = ["wkv_b"] + (["wq"] if hasattr(attn, "wq") else ["wq_b"])
    out_layout = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(attn, mesh, {**{name: ColwiseParallel() for name in per_head},
                                    "wo": RowwiseParallel(output_layouts=out_layout)})
    start, group = attn.kv_lora_rank, mesh.get_group()
    attn.wkv_a.register_forward_hook(lambda mod, args, out: _SumGradColumns.apply(out, start, group))
    if sequence_parallel:  # the latents are computed on the whole sequence
        _on_first_arg(attn, lambda x: _as_full_local(x, mesh))


class _SumGradColumns(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient of the last-dim columns [start:]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, start: int, group) -> torch.Tensor:
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        columns = grad[..., ctx.start:].contiguous()
        torch.distributed.all_reduce(columns, group=ctx.group)
        grad[..., ctx.start:] = columns
        return grad, None, None


register_tensor_parallel_handler(GroupedQueryAttention, _attention_handler)
register_tensor_parallel_handler(MultiHeadLatentAttention, _mla_handler)
register_tensor_parallel_handler(SwiGLU, _mlp_handler)


def _parallelize_embedding(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """The embedding and the head, each where this rank holds it (a pipeline stage holds the
    embedding on the first stage only, the head on the last: the other is None)."""
    embedding, head = model.tok_embeddings, model.output
    if embedding is not None and head is not None and head.weight is embedding.weight:
        if sequence_parallel:  # replicated lookup, then keep this rank's sequence shard
            embedding.register_forward_hook(lambda mod, args, out: _keep_sequence_shard(out, mesh))
        return
    out_layout = Shard(1) if sequence_parallel else Replicate()
    if embedding is not None:
        parallelize_module(embedding, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=out_layout))
    if head is not None:
        # the head sees the whole (gathered) sequence; its logits stay sharded for the loss
        parallelize_module(head, mesh, ColwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False))
        model.loss_kernel = VocabParallelLoss()


# ---------------------------------------------------------------------------- layout hooks
def _on_first_arg(module: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
    module.register_forward_pre_hook(lambda mod, args: (convert(args[0]), *args[1:]))


def _as_replicated(x: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """A replicated DTensor view of x (gathering sequence shards when x is sharded)."""
    if isinstance(x, DTensor):
        return x.redistribute(mesh, [Replicate()])
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False)


def _as_full_local(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """A plain tensor of the whole sequence (gathering sequence shards when x is sharded)."""
    return x.redistribute(mesh, [Replicate()]).to_local() if isinstance(x, DTensor) else x


def _gather_sequence(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The whole sequence from this rank's plain shard (its gradient is sliced back)."""
    shard = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
    return shard.redistribute(mesh, [Replicate()]).to_local()


def _keep_sequence_shard(out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's sequence shard of a replicated plain tensor (its gradient is gathered back)."""
    full = DTensor.from_local(out, mesh, [Replicate()], run_check=False)
    return full.redistribute(mesh, [Shard(1)]).to_local()


class _SelectKVHead(ParallelStyle):
    """A KV projection replicated on every TP rank, of which each rank keeps one head.

    Used when tp exceeds n_kv_heads: the weight stays whole (a Replicate DTensor, so
    checkpoints and optimizers see one logical tensor) and the columns of the KV head read by
    this rank's query heads are sliced off the output. Each rank's gradient covers only its
    head's rows, hence the Partial gradient placement, summed over tp by the hook that
    `apply_tensor_parallel` installs (`_match_grad_placements`).
    """

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            replicated = distribute_tensor(param.detach(), device_mesh, [Replicate()])
            module.register_parameter(name, nn.Parameter(replicated, param.requires_grad))

        def select(mod: nn.Module, args: tuple, out: DTensor) -> torch.Tensor:
            return out.to_local(grad_placements=[Partial()])[..., self.start:self.stop]

        _on_first_arg(module, lambda x: _as_replicated(x, device_mesh))
        module.register_forward_hook(select)
        return module


# ---------------------------------------------------------------------------- gradients
def _match_grad_placements(model: nn.Module) -> None:
    """Give every DTensor parameter's gradient the parameter's own placements after backward.

    DTensor's backward can hand back another layout: Partial sums for replicated parameters
    (sequence-parallel norms, replicated KV projections) and a Replicate gradient for the
    vocabulary-sharded embedding. Left so, every optimizer op would redistribute again (DTensor
    converts lazily, per op) and plain-tensor consumers (`grad.to_local()`) would read partial
    sums or the wrong slice. Converting once per backward sums the partial gradients (small
    tensors) and slices the embedding's locally. FSDP2 replaces these parameters and does the
    same itself.
    """
    for param in model.parameters():
        if isinstance(param, DTensor):
            param.register_post_accumulate_grad_hook(_to_param_placements)


def _to_param_placements(param: torch.Tensor) -> None:
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


__all__ = ["apply_tensor_parallel", "register_tensor_parallel_handler",
           "TensorParallelHandler"]
