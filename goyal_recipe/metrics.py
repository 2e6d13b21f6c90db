"""Metrics of a run: exact top-k counts, the JSONL log, throughput and the progress lines.

Everything here imports torch and the standard library only.

Units: errors and accuracies are percentages (0-100), the paper's top-1 *error* first and the
accuracy beside it; times are seconds; an epoch in a step record is fractional
(``update / updates_per_epoch``), in an epoch record it is the number of epochs completed.

The run log ``runs/<name>/metrics.jsonl`` holds one JSON object per line: a ``{"kind": "run"}``
header (name, global_batch_size, updates_per_epoch, epochs, time), then ``{"kind": "step"}``
records (update, epoch, loss, lr, images_per_s, data_wait_s, step_s, time) and
``{"kind": "epoch"}`` records (epoch, update, train_loss, train_top1_error, the ``val_*`` fields of
``EvalCounter.summary``, lr, epoch_s, time). It is written by the main process only.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "topk_correct",
    "EvalCounter",
    "JsonlWriter",
    "read_jsonl",
    "ThroughputMeter",
    "format_duration",
    "format_step_line",
    "format_epoch_line",
]


# --------------------------------------------------------------------------------------------
# Exact top-k counts


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


# --------------------------------------------------------------------------------------------
# JSONL log


def _to_json(obj: Any) -> Any:
    """``json.dumps`` hook: torch tensors and numpy numbers become Python numbers (or lists)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)  # numpy scalars (and 1-element arrays)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)  # numpy arrays
    if callable(tolist):
        return tolist()
    raise TypeError(f"metrics record value of type {type(obj).__name__} is not JSON serialisable")


class JsonlWriter:
    """Append-only JSONL log: one ``json.dumps`` line per :meth:`write`, flushed at once.

    The file is opened (in append mode, parent directories created) at the first write, so a
    writer can be built on every rank and used on the main process only; ``enabled=False``
    makes every call a no-op. A crash loses at most the line being written. When the file is
    reopened (a resumed run) a partial last line left by such a crash is removed first, so
    the next record starts on a line of its own.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file: IO[str] | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(dict(record), default=_to_json)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _end_with_complete_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end_with_complete_line(path: Path) -> None:
    """Make ``path`` (if it exists) end with a newline: drop a partial last line, or terminate
    a complete JSON record that lacks its newline."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        start = 0
        while pos > 0:  # find the last newline, reading backwards in chunks
            chunk = min(1 << 16, pos)
            pos -= chunk
            f.seek(pos)
            i = f.read(chunk).rfind(b"\n")
            if i >= 0:
                start = pos + i + 1
                break
        f.seek(start)
        tail = f.read()
        try:
            json.loads(tail)
        except ValueError:
            f.truncate(start)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL log. A truncated last line (a crash mid-write) is skipped; a
    malformed line elsewhere raises ``ValueError`` naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines):
                break  # the line being written when the run stopped
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Throughput and ETA


class ThroughputMeter:
    """Per-update wall time and data wait, images/s over a sliding window, ETA.

    Either feed measured durations with :meth:`record`, or let the meter time the loop::

        meter = ThroughputMeter(total_updates=epochs * updates_per_epoch)
        for batch in meter.timed(loader):      # time spent inside next(loader) is data wait
            ...forward/backward, and at the end of an update:
            step_s, data_wait_s = meter.step_done(images=global_batch_size)

    A step lasts from the end of the previous update (or the start of the ``timed`` loop, so
    evaluation between epochs is not counted) to :meth:`step_done`; with gradient accumulation
    the waits of all micro-batches of the update add up.
    """

    def __init__(
        self,
        total_updates: int | None = None,
        window: int = 50,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if window < 1:
            raise ValueError(f"ThroughputMeter window must be >= 1, got {window}")
        self.total_updates = total_updates
        self.window = window
        self.steps = 0  # updates recorded in all
        self._clock = clock
        self._recent: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._step_start: float | None = None
        self._pending_wait = 0.0

    # measured by the caller
    def record(self, images: int | float, step_s: float, data_wait_s: float = 0.0) -> None:
        """Add one update of ``images`` images that took ``step_s`` seconds, ``data_wait_s`` of
        them waiting for data."""
        self._recent.append((float(images), float(step_s), float(data_wait_s)))
        self.steps += 1

    # measured by the meter
    def reset_clock(self) -> None:
        """Start the next step now (after a pause such as evaluation or checkpointing)."""
        self._step_start = self._clock()
        self._pending_wait = 0.0

    def timed(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Yield from ``iterable``, counting the time spent waiting for each item as data wait."""
        self.reset_clock()
        iterator = iter(iterable)
        while True:
            start = self._clock()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._pending_wait += self._clock() - start
            yield item

    def step_done(self, images: int | float) -> tuple[float, float]:
        """Close the current update; returns its ``(step_s, data_wait_s)``."""
        now = self._clock()
        start = now if self._step_start is None else self._step_start
        step_s, data_wait_s = now - start, self._pending_wait
        self._step_start, self._pending_wait = now, 0.0
        self.record(images, step_s, data_wait_s)
        return step_s, data_wait_s

    # results over the window
    @property
    def images_per_s(self) -> float:
        seconds = sum(s for _, s, _ in self._recent)
        return sum(n for n, _, _ in self._recent) / seconds if seconds > 0 else 0.0

    @property
    def mean_step_s(self) -> float:
        return sum(s for _, s, _ in self._recent) / len(self._recent) if self._recent else 0.0

    @property
    def mean_data_wait_s(self) -> float:
        return sum(w for _, _, w in self._recent) / len(self._recent) if self._recent else 0.0

    def eta_s(self, updates_done: int, total_updates: int | None = None) -> float | None:
        """Seconds left for the remaining updates at the window's mean step time (None before
        the first step)."""
        total = self.total_updates if total_updates is None else total_updates
        if total is None:
            raise ValueError("ThroughputMeter.eta_s needs total_updates (constructor or argument)")
        if not self._recent:
            return None
        return max(total - updates_done, 0) * self.mean_step_s


# --------------------------------------------------------------------------------------------
# Progress lines


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
