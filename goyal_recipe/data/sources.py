"""Image classification sources: ImageNet folders, parquet/arrow shards, Hugging Face datasets.

Every source yields ``(transform(rgb_pil_image), label)`` (``transform(EncodedImage)`` for a
transform that decodes itself, e.g. to draft JPEGs), exposes ``classes``, ``num_classes``
and ``targets``, and maps labels by sorted synset (the ImageNet and HF ``imagenet-1k`` order), so
one image gets one label whichever copy it is read from. Sources open files lazily, so they can be
pickled into DataLoader worker processes. An image that cannot be decoded raises `BadImageError`
naming it; `load_sample` applies the recipe's policy (fail, or skip to a deterministic substitute).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ..errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow is imported by the parquet and arrow sources when they read: an image-folder run never loads it.

KINDS = ("imagefolder", "parquet", "hf")
_HF_SPLITS = {"train": "train", "val": "validation", "validation": "validation"}
_FOLDER_SPLITS = {"train": ("train",), "val": ("val", "validation"), "validation": ("val", "validation")}
BAD_IMAGE_POLICIES = ("fail", "skip")

log = logging.getLogger(__name__)

# What PIL raises for data it cannot decode: unknown format or truncated stream (OSError), broken
# headers (SyntaxError, ValueError, EOFError), and an image over PIL's pixel limit
# (DecompressionBombError, raised from the header before any pixel is decoded; the limit is kept).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class BadImageError(UserError):
    """An image that cannot be decoded; ``str()`` is one line naming the file, the reason and the fix.

    ``path`` and ``reason`` are set where it is raised. A DataLoader re-raises a worker's exception
    as ``type(e)(caught text + worker traceback)``; the constructor keeps only the original line,
    so the error that reaches the main process is still the one line with the path.
    """

    def __init__(self, message: str, path: str | None = None, reason: str | None = None):
        if path is None and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split("BadImageError: ", 1)[-1]
        super().__init__(message)
        self.path, self.reason = path, reason

    @classmethod
    def at(cls, path: str, reason: str) -> "BadImageError":
        return cls(f"cannot decode image {path}: {reason}; remove or replace the file (`goyal-data validate ROOT` "
                   "lists every bad one) or set data.bad_images=skip to train on a substitute", path, reason)


def _reason(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):  # its text holds a file object repr, not the cause
        return "not an image PIL can identify (corrupt, or an unsupported format)"
    if isinstance(err, Image.DecompressionBombError):  # "Image size (N pixels) exceeds limit of M pixels, could be ..."
        return f"decompression bomb refused: {str(err).split(',')[0].lower()}"
    first = (str(err).splitlines() or [""])[0].rstrip(".")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the stored mode: ImageNet holds CMYK and grayscale JPEGs and a PNG named .JPEG."""
    return image.convert("RGB")  # also forces the decode, so the source file may be closed after


def read_bytes(path: str) -> bytes:
    """The file's bytes; `BadImageError` naming the path if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImageError.at(path, f"unreadable ({e.strerror})") from None


def rgb_loader(path: str) -> Image.Image:
    """Folder loader: decode with PIL, always RGB; `BadImageError` naming the path if it cannot."""
    return decode_rgb(read_bytes(path), path)


class EncodedImage:
    """Image bytes not decoded yet, and the name a decode error reports.

    What a source hands to a transform with ``decodes_itself = True`` (data/decode.py) instead of an
    RGB image, so that the transform can read the header first and decode at reduced size.
    """

    __slots__ = ("data", "name")

    def __init__(self, data: bytes, name: str = "<image bytes>"):
        self.data, self.name = data, name

    def open(self) -> Image.Image:
        """The image with only its header read (size, mode, format); `BadImageError` if PIL cannot."""
        if not self.data:
            raise BadImageError.at(self.name, "empty file (0 bytes)")
        try:
            return Image.open(io.BytesIO(self.data))
        except _DECODE_ERRORS as e:
            raise BadImageError.at(self.name, _reason(e)) from None

    def decode(self, image: Image.Image) -> Image.Image:
        """The pixels of `image` (from `open`, drafted or not) as RGB; `BadImageError` if they cannot be decoded."""
        try:
            image.load()
            return image if image.mode == "RGB" else to_rgb(image)
        except _DECODE_ERRORS as e:
            raise BadImageError.at(self.name, _reason(e)) from None


def decode_rgb(data: bytes, name: str = "<image bytes>") -> Image.Image:
    """Decode encoded image bytes (any PIL format) to an RGB image; `BadImageError` naming `name` if it cannot."""
    encoded = EncodedImage(data, name)
    return encoded.decode(encoded.open())


def transform_input(transform: Callable | None, data: bytes, name: str):
    """What `transform` takes: the `EncodedImage` for a transform that decodes itself, else the RGB image."""
    if getattr(transform, "decodes_itself", False):
        return EncodedImage(data, name)
    return decode_rgb(data, name)


_reported: set[str] = set()  # per process: warn once per bad image, not once per epoch
_MAX_BAD_RUN = 100


def load_sample(dataset, index: int, bad_images: str = "fail") -> tuple:
    """``dataset[index]`` as ``(image, label, bad)`` under the bad-image policy.

    fail: the `BadImageError` propagates. skip: the next index (cyclically) whose image decodes
    stands in, with its own label, and ``bad`` is 1. The substitute is a function of the index
    alone, so resume, loader workers and world size do not change what is seen, and the sampler's
    sample count and rank split stay as they are.
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
    try:
        image, label = dataset[index]
        return image, label, 0
    except BadImageError as err:
        if bad_images == "fail":
            raise
        first = err
    n = len(dataset)
    for step in range(1, min(n, _MAX_BAD_RUN)):
        other = (index + step) % n
        try:
            image, label = dataset[other]
        except BadImageError:
            continue
        if str(first) not in _reported:
            _reported.add(str(first))
            log.warning("skipping bad image %s (%s): sample %d replaced by sample %d",
                        first.path, first.reason, index, other)
        return image, label, 1
    # A long run of failures is broken data, not a few bad files: stop instead of decoding it all per sample.
    raise BadImageError(f"{min(n, _MAX_BAD_RUN)} images in a row from {first.path} cannot be decoded ({first.reason}); "
                        "check data.root and run `goyal-data validate ROOT`", first.path, first.reason)


def _folder_error(problem: str, root) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}; point data.root at an ImageNet copy with train/<synset>/ and val/<synset>/ image folders, "
        f"or run `goyal-data generate {root}`"
    )


def _parquet_error(problem: str, root) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}; point data.root at a directory of train-00000-of-0000N.parquet and validation-* shards "
        f"(HF imagenet-1k layout), or run `goyal-data generate {root}`"
    )


class ImageFolderSource(ImageFolder):
    """ImageNet folder layout ``root_split_dir/<synset>/<image>``; labels follow sorted synsets."""

    def __init__(self, root_split_dir: str | os.PathLike, transform: Callable | None = None):
        root = Path(root_split_dir)
        if not root.is_dir():
            raise _folder_error(f"image folder {root} does not exist", root.parent)
        try:
            super().__init__(str(root), transform=transform, loader=rgb_loader)
        except FileNotFoundError:
            raise _folder_error(f"{root} has no class folders, or a class folder without images", root.parent) from None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = transform_input(self.transform, read_bytes(path), path)
        return (image if self.transform is None else self.transform(image)), target


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
    hf_split = _HF_SPLITS.get(split, split)
    for directory in (root / "parquet", root / "data", root):
        files = _split_files(directory, hf_split)
        if files:
            return files
    return []


def _open_arrow(path: str) -> pa.Table:
    # Memory-mapped: random access without reading the file. `datasets` writes the stream format.
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()


def _label_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    feature = json.loads(meta).get("info", {}).get("features", {}).get(label_column, {})
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and "names" in feature else None


class _ClassList:
    """num_classes and class_to_idx from a sorted `classes` list (the ImageFolder convention)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


class ParquetSource(_ClassList, Dataset):
    """Rows of image bytes and int labels in local parquet (or arrow) shards.

    Columns: `image` either a struct {bytes, path} (the ``datasets.Image()`` encoding) or raw
    binary, and `label` (int). Class names come from `classes`, else the HF ClassLabel metadata,
    else a ``synsets.txt`` beside or above the shards. A sample read decodes one parquet row group
    (kept in a small per-process cache), so random access is cheap only with small row groups:
    for large HF shards prefer kind "hf", which converts once to memory-mapped Arrow.
    """

    def __init__(
        self,
        files: list[str | os.PathLike] | str | os.PathLike,
        transform: Callable | None = None,
        classes: list[str] | None = None,
        image_column: str = "image",
        label_column: str = "label",
        cache_size: int = 4,
    ):
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not files:
            raise _parquet_error("no parquet shards given", "ROOT")
        self.files = [str(f) for f in files]
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise _parquet_error(f"parquet shard {missing[0]} does not exist", "ROOT")
        self.transform, self.cache_size = transform, cache_size
        self.image_column, self.label_column = image_column, label_column
        self._cache: OrderedDict = OrderedDict()
        self._handles: dict = {}

        # Index every (file, row group) by its first global row; read only the label column.
        labels, self._starts, self._groups, total, schema = [], [], [], 0, None
        for fi, path in enumerate(self.files):
            if path.endswith(".arrow"):
                table = _open_arrow(path)
                groups = [(table.num_rows, table.column(label_column))]
                schema = schema or table.schema
            else:
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(path)
                schema = schema or pf.schema_arrow
                groups = [
                    (pf.metadata.row_group(g).num_rows, pf.read_row_group(g, columns=[label_column]).column(0))
                    for g in range(pf.num_row_groups)
                ]
            for g, (rows, column) in enumerate(groups):
                if rows:
                    self._starts.append(total)
                    self._groups.append((fi, g))
                    labels.append(column.to_numpy())
                    total += rows
        if total == 0:
            raise _parquet_error(f"{self.files[0]} has no rows", "ROOT")
        self.targets = np.concatenate(labels).astype(np.int64)
        self._len = total

        self.classes = classes or _label_names(schema, label_column) or self._synsets_file()
        if self.classes is None:
            raise ValueError(
                f"no class names for {self.files[0]}: pass classes=[...], "
                "or put synsets.txt (one synset per line) beside the shards"
            )
        if self.targets.min() < 0 or self.targets.max() >= len(self.classes):
            raise ValueError(
                f"labels in {self.files[0]} span [{self.targets.min()}, {self.targets.max()}] but there are "
                f"{len(self.classes)} classes: this split has no labels (such as the imagenet-1k test split) "
                "or the class list is wrong"
            )

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
        if path.endswith(".arrow"):
            if fi not in self._handles:
                self._handles[fi] = _open_arrow(path)
            column = self._handles[fi].column(self.image_column)
        else:
            if fi not in self._handles:
                import pyarrow.parquet as pq

                self._handles[fi] = pq.ParquetFile(path)
            column = self._handles[fi].read_row_group(g, columns=[self.image_column]).column(0)
        column = column.combine_chunks()  # a struct {bytes, path} column stays whole: path names a bad row
        self._cache[group] = column
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return column

    def _cell(self, index: int, field: str):
        from pyarrow.types import is_struct

        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} rows")
        group = bisect.bisect_right(self._starts, index) - 1
        column = self._column(group)
        if is_struct(column.type):
            if column.type.get_field_index(field) < 0:
                return None
            column = column.field(field)
        elif field != "bytes":
            return None
        return column[index - self._starts[group]].as_py()

    def image_bytes(self, index: int) -> bytes:
        """The encoded image of row `index`, as stored."""
        return self._cell(index, "bytes")

    def location(self, index: int) -> str:
        """`<shard>#<row in shard>` and the stored file name, to find a bad row."""
        group = bisect.bisect_right(self._starts, index) - 1
        fi = self._groups[group][0]
        first = next(self._starts[k] for k, (f, _) in enumerate(self._groups) if f == fi)
        name = self._cell(index, "path")
        return f"{self.files[fi]}#{index - first}" + (f" ({name})" if name else "")

    def __getitem__(self, index: int):
        try:  # a transform that decodes itself raises BadImageError too
            image = transform_input(self.transform, self.image_bytes(index), "<image bytes>")
            if self.transform is not None:
                image = self.transform(image)
        except BadImageError as e:  # the row is named only on failure: it scans the row groups
            raise BadImageError.at(self.location(index), e.reason) from None
        return image, int(self.targets[index])


@contextlib.contextmanager
def hf_offline(offline: bool = True):
    """Keep `datasets` and `huggingface_hub` off the network inside the block.

    Both read HF_HUB_OFFLINE once at import, so the module flags are patched as well as the
    environment (which DataLoader workers and subprocesses inherit).
    """
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patched = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    saved = [(m, name, getattr(m, name)) for m, name in patched if hasattr(m, name)]
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for m, name, _ in saved:
        setattr(m, name, True)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_hf_dataset(
    name_or_path: str | os.PathLike, split: str, allow_download: bool = False, cache_dir: str | None = None
):
    """A `datasets.Dataset` for `split` ("train"/"val") from a local copy or the local HF cache.

    `name_or_path` is a hub name (``ILSVRC/imagenet-1k``), a ``save_to_disk`` directory, or a
    directory of parquet shards. Nothing is downloaded unless `allow_download` is true.
    """
    import datasets

    hf_split = _HF_SPLITS.get(split, split)
    path = Path(name_or_path)
    with hf_offline(not allow_download):
        if path.is_dir():
            if (path / "dataset_dict.json").is_file():
                return datasets.load_from_disk(str(path))[hf_split]
            if (path / "state.json").is_file():
                return datasets.load_from_disk(str(path))
            files = find_split_files(path, split)
            if not files:
                raise _parquet_error(f"{path} has no {hf_split} shards and no save_to_disk dataset", path)
            builder = "arrow" if files[0].suffix == ".arrow" else "parquet"
            data_files = {hf_split: [str(f) for f in files]}
            return datasets.load_dataset(builder, data_files=data_files, split=hf_split, cache_dir=cache_dir)
        try:
            return datasets.load_dataset(str(name_or_path), split=hf_split, cache_dir=cache_dir)
        except Exception as err:  # datasets raises several types for "not cached"; only offline misses land here
            if allow_download:
                raise
            cause = (str(err).splitlines() or [""])[0]
            raise FileNotFoundError(
                f"dataset {name_or_path!r} split {hf_split!r} is not in the local HF cache "
                f"({cache_dir or datasets.config.HF_DATASETS_CACHE}): download it once with allow_download=True "
                f"(data.allow_download=true), or point data.root at a local copy ({type(err).__name__}: {cause})"
            ) from err


class HFSource(_ClassList, Dataset):
    """A Hugging Face `datasets.Dataset` with an image column and a ClassLabel/int label column.

    Images are read as stored bytes and decoded with PIL to RGB, like the other sources.
    """

    def __init__(
        self,
        dataset,
        transform: Callable | None = None,
        classes: list[str] | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ):
        import datasets

        feature = dataset.features.get(image_column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.transform = dataset, transform
        self.image_column, self.label_column = image_column, label_column
        labels = dataset.with_format("arrow", columns=[label_column])[:]  # honours select()/shuffle() indices
        self.targets = labels.column(label_column).to_numpy().astype(np.int64)
        label_feature = dataset.features.get(label_column)
        names = getattr(label_feature, "names", None)
        self.classes = classes or (list(names) if names else None)
        if self.classes is None:
            raise ValueError(f"no class names in the {label_column!r} column of the dataset: pass classes=[...]")
        if len(self.targets) == 0:
            raise ValueError("the Hugging Face dataset split is empty: check the split name and data.root")
        if self.targets.min() < 0 or self.targets.max() >= len(self.classes):
            raise ValueError(
                f"labels span [{self.targets.min()}, {self.targets.max()}] but there are {len(self.classes)} classes: "
                "this split has no labels (such as the imagenet-1k test split) or the class list is wrong"
            )

    @classmethod
    def from_name(cls, name_or_path, split, transform=None, allow_download=False, cache_dir=None, **kw) -> "HFSource":
        return cls(load_hf_dataset(name_or_path, split, allow_download, cache_dir), transform, **kw)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        cell = self.dataset[int(index)][self.image_column]
        data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
        if data is None and path:
            data, name = read_bytes(path), path
        else:
            name = f"{getattr(self.dataset.info, 'dataset_name', None) or 'dataset'} row {int(index)}"
            name += f" ({path})" if path else ""
        image = transform_input(self.transform, data, name)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def build_dataset(kind: str, root: str | os.PathLike, split: str, transform: Callable | None = None, **kw) -> Dataset:
    """One split ("train" or "val") of a source.

    kind "imagefolder": root/train and root/val (or root/validation) ImageNet folders.
    kind "parquet": HF-layout shards under root, root/parquet or root/data (extra kw go to ParquetSource).
    kind "hf": a hub name in the local HF cache, a save_to_disk directory or a directory of shards
    (which `datasets` copies once into its Arrow cache); kw: allow_download=False, cache_dir=None,
    classes, image_column, label_column.
    """
    if split not in _FOLDER_SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if kind == "imagefolder":
        if kw:
            raise TypeError(f"unexpected arguments for imagefolder: {sorted(kw)}")
        root = Path(root)
        if not root.is_dir():
            raise _folder_error(f"data root {root} does not exist", root)
        for name in _FOLDER_SPLITS[split]:
            if (root / name).is_dir():
                return ImageFolderSource(root / name, transform)
        raise _folder_error(f"{root} has no {_FOLDER_SPLITS[split][0]}/ folder", root)
    if kind == "parquet":
        root = Path(root)
        if not root.exists():
            raise _parquet_error(f"data root {root} does not exist", root)
        files = find_split_files(root, split)
        if not files:
            problem = f"{root} has no {_HF_SPLITS[split]}-*.parquet shards (looked in parquet/, data/ and itself)"
            raise _parquet_error(problem, root)
        return ParquetSource(files, transform, **kw)
    if kind == "hf":
        return HFSource.from_name(root, split, transform, **kw)
    raise ValueError(f"unknown data source kind {kind!r}: choose one of {', '.join(KINDS)}")
