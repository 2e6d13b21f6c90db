"""Parquet and arrow shards of image bytes and labels (the HF ``imagenet-1k`` layout), read row by row."""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .images import EncodedImage

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow is imported where a shard is read: an image-folder run never loads it.

HF_SPLITS = {"train": "train", "val": "validation", "validation": "validation"}


def parquet_error(problem: str, root) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}; point data.root at a directory of train-00000-of-0000N.parquet and validation-* shards "
        f"(HF imagenet-1k layout), or run `goyal-data generate {root}`"
    )


def _split_files(directory: Path, split: str) -> list[Path]:
    """Shards of one split in HF naming (``<split>-00000-of-00004.parquet``), or ``<split>/*``."""
    found = []
    for ext in ("parquet", "arrow"):
        found = sorted(directory.glob(f"{split}-*.{ext}")) or sorted((directory / split).glob(f"*.{ext}"))
        if found:
            break
    return found


def find_split_files(root: str | os.PathLike, split: str) -> list[Path]:
    """Parquet/arrow shards of `split` ("train" or "val") under root, root/parquet or root/data."""
    root = Path(root)
    hf_split = HF_SPLITS.get(split, split)
    for directory in (root / "parquet", root / "data", root):
        files = _split_files(directory, hf_split)
        if files:
            return files
    return []


def open_arrow(path: str) -> pa.Table:
    """The table of an arrow file, memory-mapped: random access without reading the file."""
    import pyarrow as pa

    try:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()
    except pa.ArrowInvalid:  # `datasets` writes the stream format
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()


def _label_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    feature = json.loads(meta).get("info", {}).get("features", {}).get(label_column, {})
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and "names" in feature else None


def check_labels(targets: np.ndarray, classes: list[str], where: str) -> None:
    """Refuse labels outside the class list, naming `where` they come from."""
    if len(targets) and (targets.min() < 0 or targets.max() >= len(classes)):
        raise ValueError(
            f"labels in {where} span [{targets.min()}, {targets.max()}] but there are {len(classes)} classes: "
            "this split has no labels (such as the imagenet-1k test split) or the class list is wrong"
        )


class ClassList:
    """num_classes and class_to_idx from a sorted `classes` list (the ImageFolder convention)."""

    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


class ParquetSource(ClassList):
    """Rows of image bytes and int labels in local parquet (or arrow) shards.

    Columns: `image` either a struct {bytes, path} (the ``datasets.Image()`` encoding) or raw
    binary, and `label` (int). Class names come from `classes`, else the HF ClassLabel metadata,
    else a ``synsets.txt`` beside or above the shards. A sample read decodes one parquet row group
    (kept in a small per-process cache), so random access is cheap only with small row groups:
    for large HF shards prefer kind "hf", which converts once to memory-mapped Arrow. A sample's
    name is ``<shard>#<row in shard>`` and the stored file name, to find a bad row.
    """

    def __init__(self, files: list[str | os.PathLike] | str | os.PathLike, classes: list[str] | None = None,
                 image_column: str = "image", label_column: str = "label", cache_size: int = 4):
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not files:
            raise parquet_error("no parquet shards given", "ROOT")
        self.files = [str(f) for f in files]
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise parquet_error(f"parquet shard {missing[0]} does not exist", "ROOT")
        self.cache_size, self.image_column, self.label_column = cache_size, image_column, label_column
        self._cache: OrderedDict = OrderedDict()
        self._handles: dict = {}

        # Index every (file, row group) by its first global row; read only the label column.
        labels, self._starts, self._groups, self._file_starts, total, schema = [], [], [], [], 0, None
        for fi, path in enumerate(self.files):
            self._file_starts.append(total)
            if path.endswith(".arrow"):
                table = open_arrow(path)
                groups = [(table.num_rows, table.column(label_column))]
                schema = schema or table.schema
            else:
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(path)
                schema = schema or pf.schema_arrow
                groups = [(pf.metadata.row_group(g).num_rows, pf.read_row_group(g, columns=[label_column]).column(0))
                          for g in range(pf.num_row_groups)]
            for g, (rows, column) in enumerate(groups):
                if rows:
                    self._starts.append(total)
                    self._groups.append((fi, g))
                    labels.append(column.to_numpy())
                    total += rows
        if total == 0:
            raise parquet_error(f"{self.files[0]} has no rows", "ROOT")
        self.targets = np.concatenate(labels).astype(np.int64)
        self._len = total
        self.classes = classes or _label_names(schema, label_column) or self._synsets_file()
        if self.classes is None:
            raise ValueError(f"no class names for {self.files[0]}: pass classes=[...], "
                             "or put synsets.txt (one synset per line) beside the shards")
        check_labels(self.targets, self.classes, self.files[0])

    def _synsets_file(self) -> list[str] | None:
        here = Path(self.files[0]).resolve().parent
        for directory in (here, here.parent):
            path = directory / "synsets.txt"
            if path.is_file():
                return [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        # Open files and decoded row groups stay in the process that made them.
        state = self.__dict__.copy()
        state["_cache"], state["_handles"] = OrderedDict(), {}
        return state

    def _column(self, group: int) -> pa.Array:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        fi, g = self._groups[group]
        path = self.files[fi]
        if fi not in self._handles:
            if path.endswith(".arrow"):
                self._handles[fi] = open_arrow(path)
            else:
                import pyarrow.parquet as pq

                self._handles[fi] = pq.ParquetFile(path)
        if path.endswith(".arrow"):
            column = self._handles[fi].column(self.image_column)
        else:
            column = self._handles[fi].read_row_group(g, columns=[self.image_column]).column(0)
        column = column.combine_chunks()  # a struct {bytes, path} column stays whole: path names a bad row
        self._cache[group] = column
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return column

    def _row(self, index: int) -> tuple[bytes | None, str | None]:
        """Row `index`'s encoded image and its stored file name (None where the shard keeps no such field), from
        one lookup of its row group."""
        from pyarrow.types import is_struct

        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} rows")
        group = bisect.bisect_right(self._starts, index) - 1
        column, row = self._column(group), index - self._starts[group]
        if not is_struct(column.type):  # the bytes alone
            return column[row].as_py(), None
        fields = [column.field(f)[row].as_py() if column.type.get_field_index(f) >= 0 else None
                  for f in ("bytes", "path")]
        return fields[0], fields[1]

    def image_bytes(self, index: int) -> bytes:
        """The encoded image of row `index`, as stored."""
        return self._row(index)[0]

    def location(self, index: int) -> str:
        """`<shard>#<row in shard>` and the stored file name, to find a bad row."""
        return self._where(index, self._row(index)[1])

    def _where(self, index: int, name: str | None) -> str:
        fi = bisect.bisect_right(self._file_starts, index) - 1
        return f"{self.files[fi]}#{index - self._file_starts[fi]}" + (f" ({name})" if name else "")

    def __getitem__(self, index: int) -> tuple[EncodedImage, int]:
        data, name = self._row(index)
        return EncodedImage(data, self._where(index, name)), int(self.targets[index])
