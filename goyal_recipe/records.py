"""The records of a run's ``metrics.jsonl``: one dataclass per kind, and the one reader.

The file holds one JSON object per line, written by the main process, each with a ``kind`` first:

``run``    :class:`RunRecord`, one per start of the process (a resumed run adds one)
``step``   :class:`StepRecord`, the averages of the updates since the previous step record
``skip``   :class:`SkipRecord`, an update dropped for a non-finite loss or gradient
``epoch``  :class:`EpochRecord`, an epoch's end: training sums, exact validation counts

Units: errors and accuracies are percentages (0-100), times are seconds, ``time`` is the wall clock
(``time.time()``) when the record was made. Updates count from 1. A step record's ``epoch`` is
fractional (``update / updates_per_epoch``, the progress of Principle 1); an epoch record's is the
number of epochs completed; a skip record's is the 1-based epoch the dropped update falls in.

A resumed run repeats from its checkpoint what the interrupted one had already logged. :func:`read_run`
resolves that one way for every reader: the last record written for an update (step, skip) or an
epoch (epoch) wins; run records are all kept, in file order (one per start).

Keys that are absent when there is nothing to say stay absent (``OPTIONAL``): the noise-scale fields
of a run that does not measure it, ``val_bad_images`` of an epoch without evaluation. A key this
version does not know is kept in ``extra`` and written back; a key missing from an older file reads
as None.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from time import time as _wall_clock
from typing import Any, ClassVar, Iterable, Union

from .errors import UserError
from .metrics.jsonl import iter_jsonl

__all__ = [
    "METRICS_FILE",
    "RecordError",
    "RunRecord",
    "StepRecord",
    "SkipRecord",
    "EpochRecord",
    "Record",
    "KINDS",
    "RunLog",
    "from_dict",
    "read_run",
    "resolve",
]

METRICS_FILE = "metrics.jsonl"


class RecordError(UserError):
    """A line of a metrics file that is not a record this reader knows."""


class _Record:
    """What every kind shares: its ``kind``, conversion to and from the JSON object of its line."""

    kind: ClassVar[str]
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    """Keys left out of the line when None (absent in the file: nothing was measured)."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of this record's line: ``kind`` first, then the fields in declaration order."""
        line: dict[str, Any] = {"kind": self.kind}
        extra: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "extra":
                extra = value
            elif not (value is None and f.name in self.OPTIONAL):
                line[f.name] = value
        line.update(extra)
        return line

    @classmethod
    def _from_line(cls, line: dict[str, Any]) -> "_Record":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}  # type: ignore[arg-type]
        known = {name: line.get(name) for name in names}
        extra = {key: value for key, value in line.items() if key not in names and key != "kind"}
        return cls(**known, extra=extra)  # type: ignore[call-arg]


@dataclass(kw_only=True)
class RunRecord(_Record):
    """A start of the training process: the run's shape, and where it resumed (0 on a fresh start)."""

    kind: ClassVar[str] = "run"
    name: str
    global_batch_size: int
    """kn, the images of one update over all devices."""
    updates_per_epoch: int
    epochs: int
    world_size: int
    resumed_at_update: int
    """Updates done when this process started: the checkpoint it resumed from, 0 on a fresh start."""
    time: float = field(default_factory=_wall_clock)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(kw_only=True)
class StepRecord(_Record):
    """The training averages over the updates since the previous step record (``run.log_every_updates``)."""

    kind: ClassVar[str] = "step"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"noise_scale", "noise_grad_sq", "noise_trace_sigma"})
    update: int
    """The last update of the window (1-based)."""
    epoch: float
    """``update / updates_per_epoch``."""
    loss: float
    """Mean training loss over the window's images."""
    lr: float
    """The LR the window's last update applied."""
    bad_images: int
    """Unreadable training images the window substituted."""
    images_per_s: float
    """Over the throughput meter's sliding window of updates."""
    data_wait_s: float
    """Mean wait for data per update, same window."""
    step_s: float
    """Mean wall time per update, same window."""
    noise_scale: float | None = None
    """B_simple in images = tr(Sigma) / |G|^2 (McCandlish et al. 2018), when measured."""
    noise_grad_sq: float | None = None
    noise_trace_sigma: float | None = None
    time: float = field(default_factory=_wall_clock)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(kw_only=True)
class SkipRecord(_Record):
    """An update that no rank applied: some rank's loss or gradient was not finite."""

    kind: ClassVar[str] = "skip"
    update: int
    """The dropped update (1-based): the data position it would have completed."""
    epoch: int
    """The 1-based epoch it falls in."""
    reason: str = "non-finite loss or gradient"
    time: float = field(default_factory=_wall_clock)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(kw_only=True)
class EpochRecord(_Record):
    """An epoch's end. The ``val_*`` fields are :meth:`EvalCounter.summary`'s (None without evaluation),
    so ``EpochRecord(..., **counter.summary(total))`` fills them."""

    kind: ClassVar[str] = "epoch"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"val_bad_images"})
    epoch: int
    """Epochs completed."""
    update: int
    """Updates (data positions) completed."""
    train_loss: float
    train_top1_error: float
    """Over every training image of the epoch, summed over ranks (not a mean of window means)."""
    train_bad_images: int
    skipped_updates: int
    """Dropped updates since the run began."""
    epoch_s: float
    val_loss: float | None = None
    val_top1_error: float | None = None
    val_top5_error: float | None = None
    val_top1_acc: float | None = None
    val_top5_acc: float | None = None
    val_images: int | None = None
    """Validation images counted, each exactly once."""
    val_bad_images: int | None = None
    """Unreadable validation images left out of the counts."""
    lr: float | None = None
    """The LR of the epoch's last applied update."""
    time: float = field(default_factory=_wall_clock)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


Record = Union[RunRecord, StepRecord, SkipRecord, EpochRecord]
KINDS: dict[str, type[_Record]] = {cls.kind: cls for cls in (RunRecord, StepRecord, SkipRecord, EpochRecord)}
# The field that identifies a record of each kind: a later record with the same value replaces it.
_KEY = {"step": "update", "skip": "update", "epoch": "epoch"}


def from_dict(line: dict[str, Any]) -> Record:
    """The typed record of one line's JSON object (raises :class:`RecordError` for an unknown kind)."""
    kind = line.get("kind")
    if kind not in KINDS:
        raise RecordError(f"unknown record kind {kind!r} (expected one of {', '.join(KINDS)}); "
                          "read it with the goyal_recipe version that wrote it")
    key = _KEY.get(kind)
    if key is not None and not isinstance(line.get(key), (int, float)):
        raise RecordError(f"{kind} record without a numeric {key!r}; pass a metrics.jsonl written by goyal-train")
    return KINDS[kind]._from_line(line)  # type: ignore[return-value]


@dataclass
class RunLog:
    """The records of one run, each update and epoch once (the last written wins), sorted by it."""

    path: Path
    starts: list[RunRecord] = field(default_factory=list)
    """Every run record in file order: one per start (a resume adds one)."""
    steps: list[StepRecord] = field(default_factory=list)
    skips: list[SkipRecord] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def header(self) -> RunRecord | None:
        """The first start's record (None if the run wrote none)."""
        return self.starts[0] if self.starts else None

    def of_kind(self, kind: str) -> list[Record]:
        """The records of one kind: ``run``, ``step``, ``skip`` or ``epoch``."""
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
        return {"run": self.starts, "step": self.steps, "skip": self.skips, "epoch": self.epochs}[kind]


def read_run(path: str | os.PathLike, missing_ok: bool = False) -> RunLog:
    """The records of a run directory's ``metrics.jsonl`` (or of the file ``path`` itself).

    A resumed run's repeated records are resolved by :func:`resolve`. A truncated last line (a crash
    mid-write) is left out. Raises ``FileNotFoundError`` when the file is absent (an empty
    :class:`RunLog` with ``missing_ok``) and :class:`RecordError` naming the file and line for a line
    that is not a record.
    """
    path = Path(path)
    file = path if path.suffix == ".jsonl" and not path.is_dir() else path / METRICS_FILE
    if not file.is_file():
        if missing_ok:
            return RunLog(file)
        if not file.parent.is_dir():
            raise FileNotFoundError(f"run directory {file.parent} does not exist")
        raise FileNotFoundError(f"{file} not found ({file.parent} is not a run directory)")
    try:
        numbered = list(iter_jsonl(file))
    except ValueError as err:  # a line, not the last, that is not a JSON object
        raise RecordError(f"{err}; pass a metrics.jsonl written by goyal-train") from None
    records = []
    for number, line in numbered:
        try:
            records.append(from_dict(line))
        except RecordError as err:
            raise RecordError(f"{file}:{number}: {err}") from None
    return resolve(records, file)


def resolve(records: Iterable[Record], path: str | os.PathLike = METRICS_FILE) -> RunLog:
    """Records in the order written -> a :class:`RunLog`: the last record of each update (step, skip)
    and epoch (epoch) wins, each kind sorted by that key; run records all kept in order."""
    log = RunLog(Path(path))
    last: dict[str, dict[float, Record]] = {kind: {} for kind in _KEY}
    for record in records:
        if isinstance(record, RunRecord):
            log.starts.append(record)
        else:
            last[record.kind][getattr(record, _KEY[record.kind])] = record
    log.steps, log.skips, log.epochs = ([by[k] for k in sorted(by)] for by in last.values())  # type: ignore[misc]
    return log
