"""Workarounds for Lightning's own behaviour, each naming the upstream report it answers.

Kept apart from the strategy so that the strategy stays glue, and so that each can go once
Lightning fixes what it works around.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision


def pinned(batch: Any, device: torch.device) -> Any:
    """The batch's CPU tensors in page-locked memory when it goes to a CUDA device.

    Lightning copies a batch with `non_blocking=True`, but from pageable memory CUDA stages the
    copy and may first wait for the stream to drain, a GPU idle gap at every step's start (where
    such waits land: Lightning issue #20995). From pinned memory the copy is queued behind the
    previous step's kernels instead. A loader with `pin_memory=True` has done this already;
    pinning a micro-batch of token ids costs microseconds."""
    if device.type != "cuda":
        return batch
    from lightning.fabric.utilities.apply_func import apply_to_collection

    return apply_to_collection(batch, torch.Tensor,
                               lambda t: t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory())


def share_inf_checks(precision_plugin: Precision, device: torch.device) -> None:
    """16-mixed: make every rank agree on inf/NaN so that all skip the same steps.

    Lightning's mixed-precision plugin holds a plain `torch.amp.GradScaler`, whose inf checks see
    only this rank's gradients; with sharded gradients the ranks can then disagree. Lightning's
    own ModelParallelStrategy refuses 16-mixed for that reason (Lightning PR #19902: "This would
    require a sharded gradscaler"). torch's ShardedGradScaler all-reduces the checks, so it is
    swapped in, keeping the scale reached so far.
    """
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is None or not isinstance(scaler, torch.amp.GradScaler):
        return
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    if not isinstance(scaler, ShardedGradScaler):
        precision_plugin.scaler = ShardedGradScaler(
            device=device.type, init_scale=scaler.get_scale() if scaler.is_enabled() else 2.0**16,
            process_group=dist.group.WORLD)


def clip_across_ranks(precision_plugin: Precision, on_norm: Callable[[torch.Tensor], None],
                      stage_group: Optional[dist.ProcessGroup] = None, master_weights: Any = None) -> None:
    """Make the precision plugin clip by the norm over every rank and mesh, and report that norm.

    Lightning clips in the precision plugin with `torch.nn.utils.clip_grad_norm_`, which fails on
    DTensors of several meshes (tensor x FSDP2 beside FSDP2-only parameters, experts on their own
    mesh); `parallel.clipping.clip_grad_norm_` groups them by mesh. And Lightning's mixed-precision
    plugin refuses to clip with a fused optimizer even in bf16, where no scaler unscales inside
    the optimizer (Lightning issue #21435): without a scaler the plain path is taken. Pipeline
    stages (`stage_group`) hold different parameters, so their norms are combined too. Bound to this
    plugin instance (Lightning builds a plugin per Trainer), so clipping stays where Lightning has
    it and any LightningModule gets it. Under master weights' fused step (`master_weights`), the
    gradients are still parts held aside: the norm is taken over them and the coefficient is
    applied by the fused update (parallel/master_weights.py `clip_`)."""
    from lightning.pytorch.utilities import GradClipAlgorithmType

    from .parallel.clipping import clip_step_grad_norm_
    from .parallel.master_weights import holding

    def clip_grad_by_norm(optimizer, clip_val) -> None:
        on_norm(clip_step_grad_norm_(precision_plugin.main_params(optimizer), optimizer, clip_val,
                                     stage_group=stage_group, master_weights=master_weights))

    def clip_gradients(optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        if getattr(precision_plugin, "scaler", None) is None:  # nothing unscales inside the optimizer
            return Precision.clip_gradients(precision_plugin, optimizer, clip_val, gradient_clip_algorithm)
        return type(precision_plugin).clip_gradients(precision_plugin, optimizer, clip_val, gradient_clip_algorithm)

    def clip_grad_by_value(optimizer, clip_val) -> None:
        held = holding(master_weights, optimizer)
        if held is not None:
            held.materialize_grads()  # per element: the gradients must be in place
        Precision.clip_grad_by_value(precision_plugin, optimizer, clip_val)

    precision_plugin.clip_grad_by_norm = clip_grad_by_norm
    precision_plugin.clip_grad_by_value = clip_grad_by_value
    precision_plugin.clip_gradients = clip_gradients


def settle_fit_loop_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Make a checkpoint saved once an epoch's loop has ended resume where that run stopped.

    Lightning's loop state is ambiguous there, and with max_steps its restart goes wrong:
    - `trainer.fit(max_steps=k); trainer.save_checkpoint(path)` stopped mid-epoch: the fit loop
      has counted the epoch as completed, so the resumed run would start the next epoch number
      (its sampler shuffles differently) at the old batch index;
    - the same, stopped on the epoch's last batch (Lightning issue #19617), or a save from
      `on_train_epoch_end` (ModelCheckpoint without validation): the resumed run first trains one
      batch more in an epoch that has none left.
    So an epoch that reached its last batch is recorded as completed, with the next one to start
    at batch 0; an epoch cut short is recorded as unfinished, to continue at the next batch.
    Checkpoints saved while an epoch runs (on_train_batch_end, validation) are left unchanged.
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop")
    if not fit_loop or "epoch_progress" not in fit_loop or "epoch_loop.batch_progress" not in fit_loop:
        return checkpoint
    epoch = fit_loop["epoch_progress"]["current"]
    if not epoch["started"] or epoch["processed"] != epoch["started"]:
        return checkpoint  # saved while an epoch was running
    checkpoint = dict(checkpoint)
    checkpoint["loops"] = copy.deepcopy(checkpoint["loops"])
    fit_loop = checkpoint["loops"]["fit_loop"]
    batches = fit_loop["epoch_loop.batch_progress"]
    finished = batches["is_last_batch"]
    for progress in fit_loop["epoch_progress"].values():
        if finished:
            progress["completed"] = progress["processed"]
        else:
            progress["processed"] = progress["completed"] = progress["started"] - 1
    if finished:
        batches["current"] = {key: 0 for key in batches["current"]}
        batches["is_last_batch"] = False
    if "epoch" in checkpoint:
        checkpoint["epoch"] = fit_loop["epoch_progress"]["current"]["completed"]
    return checkpoint


def _no_tips(record: Any) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def quiet_upstream_warnings() -> None:
    """Filter the warnings of Lightning's own code that a user of this project cannot act on.

    - Lightning 2.6's `utilities/_pytree.py` tests `isinstance(treespec, LeafSpec)`, which torch
      2.10+ deprecates with a FutureWarning on every run (Lightning issue #21326, fixed upstream
      after the Lightning release installed here).
    - Lightning 2.6 logs "💡 Tip: ... try installing litlogger" on every Trainer without its
      LitLogger: an advertisement, not about the run."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)  # once: a set


def without_wandb_anonymous(logger: Any) -> Any:
    """Lightning's WandbLogger passes `anonymous=None` to wandb.init unconditionally, which wandb
    0.23+ answers with "The anonymous setting has no effect" on every run (wandb PR #10909 names
    Lightning's integration as the caller); leaving the unset value out says the same to wandb."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger


__all__ = ["pinned", "share_inf_checks", "clip_across_ranks", "settle_fit_loop_state",
           "quiet_upstream_warnings", "without_wandb_anonymous"]
