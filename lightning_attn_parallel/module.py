"""The causal-LM LightningModule: builds a model from the zoo, computes the loss, optimizes.

It never touches parallelism: the strategy hands it batches already laid out for this rank, as a
`StepBatch` (step.py) under context parallelism: a sequence shard with its global positions, the
token count to divide by, the scale that makes averaging over dp x cp exact, and how the shards'
losses add up. Gradient clipping is the precision plugin's, as everywhere in Lightning (the
strategy makes it span every rank and mesh).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional, Union

import lightning as L
import torch
from torch import nn

from .callbacks.metrics import LEARNING_RATE, TRAIN_LOSS, VAL_LOSS, host_scalar
from .callbacks.progress import loss_on_progress_bar
from .models import ModelConfig, build_model
from .models.objective import causal_lm_loss
from .step import StepBatch


class CausalLMModule(L.LightningModule):
    """Next-token prediction with AdamW (fused on GPU) and a warm-up + cosine schedule."""

    def __init__(self, model: Union[ModelConfig, dict], lr: float = 3e-4, min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 20, total_steps: Optional[int] = None,
                 loss_chunk_tokens: Optional[int] = None, pretrained: Optional[str] = None,
                 fused_loss: bool = False, optimizer: str = "adamw") -> None:
        super().__init__()
        self.model_config = model if isinstance(model, ModelConfig) else ModelConfig(**model)
        # A Hugging Face folder whose weights the strategy loads once the model is parallelized
        # (pretrained.py); recorded so that an export can carry its tokenizer through.
        self.pretrained = pretrained
        self.save_hyperparameters({"model": asdict(self.model_config), "lr": lr, "min_lr_ratio": min_lr_ratio,
                                   "weight_decay": weight_decay, "betas": tuple(betas),
                                   "warmup_steps": warmup_steps, "total_steps": total_steps,
                                   "loss_chunk_tokens": loss_chunk_tokens, "pretrained": pretrained,
                                   "fused_loss": fused_loss, "optimizer": optimizer})
        if optimizer not in OPTIMIZERS:
            from .errors import UserError

            raise UserError(f"optimizer={optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
        self.model: Optional[nn.Module] = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        if self.pretrained and getattr(strategy, "materializes_meta_models", False):
            # Built on the meta device: the strategy applies its plan, then allocates only this
            # rank's shards and fills them from the folder, so no rank ever holds the whole model.
            with torch.device("meta"):
                self.model = build_model(self.model_config)
            return
        if self.pretrained and strategy is not None:
            from .errors import UserError

            raise UserError(f"CausalLMModule(pretrained={self.pretrained!r}) loads under "
                            f"strategy='attn_hybrid' only (this Trainer's is {type(strategy).__name__}): "
                            "use Trainer(strategy='attn_hybrid'), whose plan decides what each rank reads")
        self.model = build_model(self.model_config)

    # ------------------------------------------------------------------ loss
    def _loss(self, batch: Union[StepBatch, dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to differentiate, mean token loss of the whole step to log)."""
        # fused_loss: liger's fused head + cross-entropy where it can run (models/fused_loss.py)
        return causal_lm_loss(self.model, batch, self.hparams.loss_chunk_tokens,
                              fused=bool(self.hparams.get("fused_loss")))

    def training_step(self, batch: Union[StepBatch, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        loss, reported = self._loss(batch)
        # Lightning reads progress-bar values back to the host after every step (a GPU stall):
        # only where a bar needs it (callbacks/progress.py)
        self.log(TRAIN_LOSS, reported, prog_bar=loss_on_progress_bar(self._trainer))
        return loss

    def validation_step(self, batch: Union[StepBatch, dict[str, Any]], batch_idx: int) -> None:
        _, reported = self._loss(batch)
        self.log(VAL_LOSS, reported, prog_bar=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log(LEARNING_RATE, host_scalar(optimizer.param_groups[0]["lr"]))  # no GPU stall

    def configure_callbacks(self) -> list[L.Callback]:
        if not self.model_config.is_moe:
            return []
        from .callbacks.routing_loads import ShareRoutingLoads

        return [ShareRoutingLoads()]  # every replica of a router sees the same loads

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.model_config.is_moe and self.model_config.bias_update_speed > 0:
            from .models.deepseek import update_moe_biases

            update_moe_biases(self.model)  # auxiliary-loss-free balancing (DeepSeek-V3)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        # Two groups, by weight decay (in the order earlier checkpoints numbered them): the model
        # decides them, not the plan, so optimizer states and the schedule saved under one plan
        # resume under any other (parallel/optimizer_step.py lets fused AdamW take a group that
        # mixes plain and DTensor parameters).
        param_groups = optimizer_groups(self.model, self.hparams.weight_decay)
        if self.hparams.get("optimizer", "adamw") == "adamw_bf16_stochastic_round":
            optimizer = _stochastic_rounding_adamw(param_groups, self.hparams)
        else:
            # Fused AdamW unscales fp16 gradients inside its step, after clipping would have run.
            fused = next(self.model.parameters()).is_cuda and self.trainer.precision != "16-mixed"
            optimizer = torch.optim.AdamW(param_groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                          fused=fused or None)
        total = self.hparams.total_steps or self.trainer.estimated_stepping_batches
        warmup = min(self.hparams.warmup_steps, max(1, int(total) // 10))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, int(total),
                                                                               self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups by weight decay (matrices decay; embeddings, norms and biases do not), in the
    order checkpoints number them; a Fabric loop builds its optimizer from the same groups."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    return [{"params": params, "weight_decay": wd} for params, wd in ((no_decay, 0.0), (decay, weight_decay)) if params]


# "adamw": torch's (fused on GPU); "adamw_bf16_stochastic_round": torchao's AdamW on bf16 weights
# and states, rounding each update stochastically so that updates smaller than a bf16 step are
# kept in expectation (the memory-lean alternative to master weights; precision="bf16-true").
OPTIMIZERS = ("adamw", "adamw_bf16_stochastic_round")


def _stochastic_rounding_adamw(param_groups: list, hparams: Any) -> torch.optim.Optimizer:
    from .errors import UserError

    if any(p.dtype != torch.bfloat16 for group in param_groups for p in group["params"]):
        raise UserError("optimizer='adamw_bf16_stochastic_round' updates bf16 weights: train with "
                        "precision='bf16-true', or use optimizer='adamw'")
    try:
        import torchao.optim as torchao_optim
    except ImportError:
        raise UserError("optimizer='adamw_bf16_stochastic_round' needs torchao: pip install torchao, "
                        "or use optimizer='adamw'") from None
    # torchao 0.18 names its plain AdamW (the one with bf16_stochastic_round) `_AdamW`
    AdamW = getattr(torchao_optim, "AdamW", None) or torchao_optim._AdamW
    return AdamW(param_groups, lr=hparams.lr, betas=tuple(hparams.betas), bf16_stochastic_round=True)


def _warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
