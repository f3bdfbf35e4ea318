"""Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU, SDPA) following the model protocol.

Protocol (all that the parallelisms rely on):
- `model.blocks`: a ModuleList; each block has `attention` and `ffn`;
- `attention` computes q, k, v and calls `self.kernel(q, k, v, positions)`, adding
  `document_ids=` only for packed documents (kernels that never see packed batches need not take it);
- `model(tokens, positions, document_ids)` returns the final hidden states; `model.output` is the
  LM head;
- `model.flops_per_token(seq_len)`.
Reshapes use -1 for head counts so tensor parallelism can shard projections without the model
knowing how many heads are local.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import ModelConfig
from .flops import flops_per_token
from .fused_projections import project
from .layers import LocalAttentionKernel, RMSNorm, SwiGLU, init_linear_weights
from .loss import TokenCrossEntropy
from .rope import RopeScaling, RotaryEmbedding


def run_kernel(kernel: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, document_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Call the attention kernel slot; `document_ids` is passed only for packed documents."""
    if document_ids is None:
        return kernel(q, k, v, positions)
    return kernel(q, k, v, positions, document_ids=document_ids)


class GroupedQueryAttention(nn.Module):
    projection_groups = (("wq", "wk", "wv"),)  # what `fuse_projections` runs as one GEMM

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, RopeScaling.of(cfg))
        self.kernel: nn.Module = LocalAttentionKernel()
        self.fuse_projections = False  # q|k|v as one GEMM (models/fused_projections.py)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t.reshape(b, s, -1, self.head_dim).transpose(1, 2)
                   for t in project(x, (self.wq, self.wk, self.wv), self.fuse_projections))
        q, k = self.rope(q, positions), self.rope(k, positions)
        out = run_kernel(self.kernel, q, k, v, positions, document_ids)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, document_ids)
        return h + self.ffn(self.ffn_norm(h))


class CausalTransformer(nn.Module):
    """Embedding, blocks, final norm and LM head: shared by every family in the zoo."""

    def __init__(self, cfg: ModelConfig, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.loss_kernel: nn.Module = TokenCrossEntropy()  # slot: sums token losses of the head's logits
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if next(self.parameters()).is_meta:
            return
        init_linear_weights(self, self.config.init_std)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states (B, S, d_model); positions default to 0..S-1.

        Packed documents: `document_ids` (B, S) keeps attention inside each document, and
        `positions` (B, S) restart at 0 for each one.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok_embeddings(tokens)
        for block in self.blocks:
            h = block(h, positions, document_ids)
        return self.norm(h)

    def logits(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
               document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.output(self(tokens, positions, document_ids))

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self, seq_len)


def build_llama(cfg: ModelConfig) -> CausalTransformer:
    blocks = [TransformerBlock(cfg, GroupedQueryAttention(cfg), SwiGLU(cfg.d_model, cfg.ffn_dim))
              for _ in range(cfg.n_layers)]
    return CausalTransformer(cfg, blocks)
