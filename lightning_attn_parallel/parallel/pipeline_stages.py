"""Pipeline stages from the model protocol: a rank keeps the blocks of its stages (and the
embedding on the first stage, the final norm and LM head on the last) and drops the rest.

The model stays one module under its own parameter names (`blocks.5.attention.wq.weight` on
whichever rank holds block 5), so state dicts, DCP checkpoints and Hugging Face loads and exports
see the same names as without pipelining, and the optimizer sees exactly this rank's parameters.
Each stage is a `StageModule`, a view over the model's own modules that runs its slice of the
forward; torch.distributed.pipelining wraps the views in PipelineStage.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch import nn

from ..models.flops import WHOLE_MODEL_MATMUL_PARAMS, active_matmul_params
from ..models.protocol import moe_layers
from ..pipeline_plan import balanced_layout, num_stages, stage_blocks, stage_ranks_of
from ..plan import ParallelPlan


class KeptBlocks(nn.ModuleList):
    """The blocks a pipeline rank holds, registered under their indices in the whole model, so
    their parameter names are the whole model's. Iteration, `len` and integer indexing are over the
    kept blocks in order (positional), as for the ModuleList they replace."""

    def __init__(self, blocks: dict[int, nn.Module]) -> None:
        super().__init__()
        for index, block in blocks.items():
            self.add_module(str(index), block)

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        setattr(self, list(self._modules)[idx], module)

    @property
    def indices(self) -> list[int]:
        """The kept blocks' indices in the whole model."""
        return [int(k) for k in self._modules]


class AuxLossBackward(torch.autograd.Function):
    """Returns the activation `h` unchanged; its backward also sends `scale` as the gradient of
    the stage's MoE balance loss `aux`, so that loss joins this micro-batch's backward.

    Written by hand because torch.distributed.pipelining has no channel for side losses: a stage
    returns one activation and only the last stage has a loss function, while the balance losses
    arise on every stage (Megatron-Core's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.aux_like = (aux.shape, aux.dtype, aux.device)
        ctx.scale = scale
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_like
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class StageModule(nn.Module):
    """One stage's slice of CausalTransformer.forward: the embedding (first stage), its blocks,
    the final norm (last stage). The LM head and the loss run in the schedule's loss function on
    the last stage, so the logits are never kept as a stage output. The head is still registered
    here (`output`, unused by `forward`): FSDP2 shards it with the last stage's root unit, which
    keeps it gathered for the loss, and the zero-bubble schedules compute weight gradients for the
    stage's own parameters only.

    `positions` are the RoPE positions of the tokens this rank holds, set per batch by the runner
    (parallel/pipeline.py): 0..S-1, or the global positions of a context-parallel shard. They
    cannot be read off the activation: under sequence parallelism it holds 1/tp of the sequence,
    under context parallelism positions that are not contiguous (packed documents are refused).

    MoE blocks leave a balance loss on their ffn (`aux_loss`) after each forward; the stage adds
    their sum to the backward through `AuxLossBackward`, scaled by `aux_scale` (set per batch by
    the runner: 1 / (micro-batches x accumulated batches), as the one-process step weighs the
    balance loss of the whole batch), and sums the micro-batches' losses in `aux_total` for the log."""

    def __init__(self, transformer: nn.Module, blocks: list[nn.Module], first: bool, last: bool) -> None:
        super().__init__()
        self.tok_embeddings = transformer.tok_embeddings if first else None
        self.blocks = nn.ModuleList(blocks)
        self.norm = transformer.norm if last else None
        self.output = transformer.output if last else None  # run by the loss (docstring)
        self.positions: Optional[torch.Tensor] = None
        # the model protocol's MoE blocks (models.protocol.moe_layers): an ffn holding routed experts
        self.moe = [ffn for _, ffn in moe_layers(self)]
        self.aux_scale = 1.0
        self.aux_total: Optional[torch.Tensor] = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        positions = self.positions
        assert positions is not None, "the pipeline runner sets the stage's positions before each batch"
        for block in self.blocks:
            h = block(h, positions)
        h = self._add_aux_loss(h)
        return self.norm(h) if self.norm is not None else h

    def _add_aux_loss(self, h: torch.Tensor) -> torch.Tensor:
        losses = [m.aux_loss for m in self.moe if m.aux_loss is not None]
        if not losses:
            return h
        aux = torch.stack(losses).sum()
        self.aux_total = aux.detach() if self.aux_total is None else self.aux_total + aux.detach()
        if not (torch.is_grad_enabled() and aux.requires_grad):
            return h
        return AuxLossBackward.apply(h, aux, self.aux_scale)


def block_costs(transformer: nn.Module) -> tuple[list[float], float]:
    """(cost of each block, cost of the head) in matmul parameters a token passes through, the
    quantity FLOPs per token follow (models.flops.active_matmul_params: routed experts count
    top_k / n_routed of theirs)."""
    return [active_matmul_params(block) for block in transformer.blocks], float(transformer.output.weight.numel())


def layout_of(transformer: nn.Module, plan: ParallelPlan) -> list[int]:
    """Blocks per stage: the plan's `pp_layers_per_stage`, or balanced by cost."""
    if plan.pp_layers_per_stage is not None:
        return [int(n) for n in plan.pp_layers_per_stage]
    costs, head = block_costs(transformer)
    return balanced_layout(costs, num_stages(plan), last_cost=head)


def split_into_stages(transformer: nn.Module, plan: ParallelPlan, pp_rank: int) -> list[tuple[int, StageModule]]:
    """Keep this pipeline rank's part of `transformer` in place and return its (stage index,
    StageModule) pairs, in stage order (blocks per stage: `layout_of`)."""
    ranges = stage_blocks(layout_of(transformer, plan))
    last = len(ranges) - 1
    # MFU counts the whole model's FLOPs per token on every stage (models/flops.py)
    setattr(transformer, WHOLE_MODEL_MATMUL_PARAMS, active_matmul_params(transformer))
    mine = stage_ranks_of(plan)[pp_rank]
    all_blocks = list(transformer.blocks)
    kept = {i: all_blocks[i] for s in mine for i in ranges[s]}
    transformer.blocks = KeptBlocks(kept)
    stages = [(s, StageModule(transformer, [all_blocks[i] for i in ranges[s]], s == 0, s == last))
              for s in mine]
    if 0 not in mine:
        transformer.tok_embeddings = None
    if last not in mine:
        transformer.norm = None
        transformer.output = None
    return stages


def is_pipeline_stage(transformer: nn.Module) -> bool:
    """Whether `transformer` holds only a pipeline rank's part of the model."""
    return isinstance(getattr(transformer, "blocks", None), KeptBlocks)


def holds_stages(model: nn.Module) -> bool:
    """Whether `model` (a protocol model or a module around one) is a pipeline rank's part."""
    return any(isinstance(m, KeptBlocks) for m in model.modules())


def gather_stages_to_rank0(model: nn.Module, state: dict) -> dict:
    """Rank 0's full state dict (`state`, its own stages' tensors on its CPU) completed with the
    other stages' tensors, sent to it one at a time by the lowest rank holding each; the other
    ranks return `state` unchanged. Collective over the world; a stage's sharded (DTensor) tensors
    are gathered over their mesh first. By hand: the state-dict API gathers DTensors over their
    meshes, but a stage's tensors exist on other ranks only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    held = get_model_state_dict(model)
    mine = {name: (tuple(t.shape), t.dtype) for name, t in held.items()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    owner: dict[str, int] = {}
    for r, names in enumerate(everyone):
        for name in names:
            owner.setdefault(name, r)
    me = dist.get_rank()
    for name in sorted(owner):
        src = owner[name]
        if src == 0:
            continue
        tensor = held.get(name)
        if isinstance(tensor, DTensor):  # every rank holding a shard joins, in the same order
            tensor = tensor.full_tensor()
        if me == src:
            dist.send(tensor.detach().contiguous(), dst=0)
        elif me == 0:
            shape, dtype = everyone[src][name]
            buffer = torch.empty(shape, dtype=dtype, device=next(model.parameters()).device)
            dist.recv(buffer, src=src)
            state[name] = buffer.cpu()
    return state


__all__ = ["AuxLossBackward", "KeptBlocks", "StageModule", "block_costs", "gather_stages_to_rank0", "holds_stages",
           "is_pipeline_stage", "layout_of", "split_into_stages"]
