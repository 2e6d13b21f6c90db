"""Exact validation counts: top-k correct and the loss sum as counts that add up over batches and ranks.

Rates (percent, the paper's top-1 *error* first and the accuracy beside it) are computed once from
the summed counts, so no average of averages enters a reported error.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["topk_correct", "EvalCounter"]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k`` in ``ks``.

    Returns a float64 tensor of shape ``(len(ks),)`` on ``logits.device`` holding *counts* (not
    rates), so counts from several ranks or batches add up exactly. A ``k`` larger than the number
    of classes is clipped to it (every sample is then correct). Ties between logits are broken as
    ``torch.topk`` breaks them.
    """
    if logits.ndim != 2:
        raise ValueError(f"topk_correct expects logits of shape (batch, classes), got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"topk_correct: targets of shape {tuple(targets.shape)} do not match "
            f"{logits.shape[0]} rows of logits"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"topk_correct: every k must be >= 1, got {tuple(ks)}")
    num_classes = logits.shape[1]
    maxk = min(max(ks), num_classes)
    top = logits.detach().topk(maxk, dim=1).indices  # (batch, maxk), best first
    hit = top.eq(targets.detach().view(-1, 1))  # at most one True per row
    counts = [hit[:, : min(k, num_classes)].sum() for k in ks]
    return torch.stack(counts).to(torch.float64)


class EvalCounter:
    """Accumulates exact validation counts: loss sum, top-1 and top-5 correct, sample count.

    The state is one float64 tensor ``[loss_sum, top1_correct, top5_correct, images]`` on the
    device of the first logits seen, so an engine sums it over ranks with one all-reduce::

        counter = EvalCounter()
        for images, targets in val_loader:
            logits = model(images)
            counter.update(logits, targets, F.cross_entropy(logits, targets, reduction="none"))
        total = counter.as_tensor()
        torch.distributed.all_reduce(total)  # or accelerator.reduce(total, "sum")
        record.update(counter.summary(total))

    Rates are computed once from the summed counts: no average of averages, and an uneven last
    batch or rank weighs exactly its number of images.
    """

    SIZE = 4

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._state: torch.Tensor | None = None
        self._device = None if device is None else torch.device(device)

    def _zeros(self, device: torch.device | None) -> torch.Tensor:
        return torch.zeros(self.SIZE, dtype=torch.float64, device=device)

    def update(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        per_sample_loss: torch.Tensor | None = None,
    ) -> None:
        """Add one batch. ``per_sample_loss`` has shape ``(batch,)``; if None, cross-entropy."""
        if self._state is None:
            self._state = self._zeros(self._device or logits.device)
        logits = logits.detach()
        if per_sample_loss is None:
            per_sample_loss = F.cross_entropy(logits.float(), targets, reduction="none")
        per_sample_loss = per_sample_loss.detach()
        if per_sample_loss.shape != targets.shape:
            raise ValueError(
                f"EvalCounter.update: per_sample_loss of shape {tuple(per_sample_loss.shape)} must be "
                f"per sample, shape {tuple(targets.shape)} (use reduction='none')"
            )
        device = self._state.device
        batch = torch.stack(
            [
                per_sample_loss.to(device=device, dtype=torch.float64).sum(),
                *topk_correct(logits, targets, (1, 5)).to(device),
                torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=device),
            ]
        )
        self._state += batch

    def as_tensor(self) -> torch.Tensor:
        """A copy of the counts ``[loss_sum, top1_correct, top5_correct, images]`` to all-reduce."""
        if self._state is None:
            return self._zeros(self._device)
        return self._state.clone()

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "EvalCounter":
        """A counter holding the counts ``t`` (for example the all-reduced sum)."""
        if t.shape != (cls.SIZE,):
            raise ValueError(f"EvalCounter.from_tensor expects shape ({cls.SIZE},), got {tuple(t.shape)}")
        counter = cls(device=t.device)
        counter._state = t.detach().to(torch.float64).clone()
        return counter

    def summary(self, t: torch.Tensor | None = None) -> dict[str, Any]:
        """The ``val_*`` fields of an epoch record, from this counter or from the counts ``t``.

        ``counter.summary()`` summarises this counter; ``counter.summary(total)`` summarises the
        counts ``total`` (for example the all-reduced ``as_tensor()``), as does
        ``EvalCounter.from_tensor(total).summary()``. With no images every rate is None and
        ``val_images`` is 0.
        """
        t = self.as_tensor() if t is None else t
        if t.shape != (self.SIZE,):
            raise ValueError(f"EvalCounter.summary expects counts of shape ({self.SIZE},), got {tuple(t.shape)}")
        loss_sum, top1, top5, n = t.detach().to(device="cpu", dtype=torch.float64).tolist()
        images = int(round(n))
        if images == 0:
            rates: dict[str, Any] = dict.fromkeys(
                ("val_loss", "val_top1_error", "val_top5_error", "val_top1_acc", "val_top5_acc")
            )
            return {**rates, "val_images": 0}
        return {
            "val_loss": loss_sum / n,
            "val_top1_error": 100.0 * (n - top1) / n,
            "val_top5_error": 100.0 * (n - top5) / n,
            "val_top1_acc": 100.0 * top1 / n,
            "val_top5_acc": 100.0 * top5 / n,
            "val_images": images,
        }
