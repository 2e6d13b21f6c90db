"""Loss normalisation by the whole global minibatch (Remark 3)."""

from __future__ import annotations

import torch

from .first_update import record_loss

GRAD_REDUCTIONS = ("mean", "sum")


def global_batch_loss(per_sample_loss: torch.Tensor, global_batch_size: int, world_size: int = 1,
                      grad_reduction: str = "mean") -> torch.Tensor:
    """The micro-batch loss to back-propagate so that the update's gradient is the mean over all kn samples.

    Remark 3: each worker's loss is normalised by the total minibatch kn, not by its own n, and
    the per-worker gradients are then summed. Gradient accumulation sums micro-batch gradients
    in `.grad`, so every micro-batch of every rank contributes sum(loss_i) / kn.

    `grad_reduction` is how the engine combines gradients across ranks:
      "mean" (DDP, accelerate, DeepSpeed): the allreduce divides by `world_size`, so the loss is
        multiplied by `world_size` to cancel it;
      "sum" (a plain allreduce-sum, as in the paper): nothing to cancel.

    `global_batch_size` is the number of samples in the whole update across ranks and
    micro-batches; with uneven micro-batches pass the true total, and the result is still the
    exact mean. DeepSpeed also divides the loss by its gradient accumulation steps inside
    `engine.backward` unless `scale_wrt_gas=False`; the DeepSpeed engine accounts for that.
    """
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"unknown grad_reduction {grad_reduction!r}; use one of {', '.join(GRAD_REDUCTIONS)}")
    if global_batch_size <= 0 or world_size <= 0:
        raise ValueError(f"global_batch_size and world_size must be > 0, got {global_batch_size}, {world_size}")
    scale = (world_size if grad_reduction == "mean" else 1) / global_batch_size
    loss = per_sample_loss.sum() * scale
    record_loss(per_sample_loss.numel(), scale, loss)  # lets a FirstUpdateCheck see the normalisation really used
    return loss
