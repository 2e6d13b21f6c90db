"""Per-update wall time, data wait, images/s over a sliding window, and the ETA (seconds)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

__all__ = ["ThroughputMeter"]


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
