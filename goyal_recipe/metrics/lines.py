"""The fixed-format progress lines of the main process: one per logged update, one per epoch."""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["format_duration", "format_step_line", "format_epoch_line"]


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (hours unbounded); ``-:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    total = int(round(max(seconds, 0.0)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_lr(lr: float) -> str:
    # 4 decimals cover the paper's range (0.0001 .. 3.2 and beyond) in 6 characters;
    # smaller non-zero LRs switch to scientific notation rather than print 0.0000.
    return f"{lr:6.4f}" if lr == 0 or abs(lr) >= 5e-5 else f"{lr:.2e}"


def format_step_line(
    epoch: int,
    epochs: int,
    update_in_epoch: int,
    updates_per_epoch: int,
    loss: float,
    lr: float,
    images_per_s: float,
    data_wait_s: float,
    eta_s: float | None,
) -> str:
    """One fixed-format progress line; epoch and step are padded to the width of their totals
    so successive lines align, e.g.
    ``epoch  3/90  step 120/156  loss 2.3456  lr 1.6500  img/s  8123.4  data 0.012s  eta 1:02:03``.
    """
    return (
        f"epoch {epoch:>{len(str(epochs))}}/{epochs}  "
        f"step {update_in_epoch:>{len(str(updates_per_epoch))}}/{updates_per_epoch}  "
        f"loss {loss:6.4f}  lr {_format_lr(lr)}  img/s {images_per_s:7.1f}  "
        f"data {data_wait_s:5.3f}s  eta {format_duration(eta_s)}"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def format_epoch_line(record: Mapping[str, Any], epochs: int | None = None) -> str:
    """One line summarising an epoch record: train loss and error, validation top-1/top-5 error
    with accuracy beside it, validation images counted, epoch time."""
    epoch = record["epoch"]
    head = f"epoch {epoch}" if epochs is None else f"epoch {epoch:>{len(str(epochs))}}/{epochs}"
    parts = [
        f"{head} done",
        f"train loss {record['train_loss']:.4f}",
        f"train top-1 err {_pct(record.get('train_top1_error'))}",
    ]
    if record.get("val_top1_error") is None:
        parts.append("val n/a")
    else:
        if record.get("val_loss") is not None:
            parts.append(f"val loss {record['val_loss']:.4f}")
        parts.append(
            f"val top-1 err {_pct(record['val_top1_error'])} (acc {_pct(record.get('val_top1_acc'))})"
        )
        parts.append(
            f"top-5 err {_pct(record.get('val_top5_error'))} (acc {_pct(record.get('val_top5_acc'))})"
        )
        parts.append(f"on {record.get('val_images')} images")
    parts.append(f"time {format_duration(record.get('epoch_s'))}")
    return "  ".join(parts)
