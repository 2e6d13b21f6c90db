"""Append-only JSONL files (``metrics.jsonl``, the per-rank sample logs): write a line, read them back.

What a line of ``metrics.jsonl`` holds is declared in :mod:`goyal_recipe.records`; this module only
knows JSON objects, one per line, and the partial last line a crash can leave.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Protocol

import torch

__all__ = ["JsonlWriter", "iter_jsonl", "read_jsonl"]


class AsDict(Protocol):
    """A typed record (:mod:`goyal_recipe.records`): the JSON object of its line."""

    def as_dict(self) -> dict[str, Any]: ...


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

    def write(self, record: Mapping[str, Any] | AsDict) -> None:
        """Append ``record``: a mapping, or a typed record (its ``as_dict()``)."""
        if not self.enabled:
            return
        fields = record if isinstance(record, Mapping) else record.as_dict()
        line = json.dumps(dict(fields), default=_to_json)
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


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each record of a JSONL file. A truncated last line (a crash
    mid-write) is skipped; a malformed line elsewhere raises ``ValueError`` naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines):
                return  # the line being written when the run stopped
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL file, as :func:`iter_jsonl` reads them."""
    return [record for _, record in iter_jsonl(path)]
