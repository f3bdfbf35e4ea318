"""The RoPE scaling fields of a model config (rope.py computes the tables; this part needs no torch,
so a config can be read and checked before torch is imported)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

SCALINGS = ("none", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """The scaling fields of a ModelConfig (`rope_*`), gathered; kind "none" is plain RoPE."""

    kind: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0: unset
    mscale_all_dim: float = 0.0  # 0: unset
    attention_factor: Optional[float] = None  # None: derived from factor and the mscales
    truncate: bool = True

    @classmethod
    def of(cls, cfg) -> "RopeScaling":
        """The scaling a ModelConfig asks for: its `rope_<field>` values (`rope_scaling` the kind)."""
        return cls(**{f.name: getattr(cfg, "rope_scaling" if f.name == "kind" else f"rope_{f.name}")
                      for f in fields(cls)})


__all__ = ["SCALINGS", "RopeScaling"]
