"""Image classification sources: ImageNet folders, parquet/arrow shards, Hugging Face datasets.

A source is a sequence of samples ``(EncodedImage(bytes, name), label)``: the stored bytes, the name
a decode error reports, and the label; nothing is decoded here (data/reader.py decodes). Every
source exposes ``classes``, ``num_classes`` and ``targets``, and maps labels by sorted synset (the
ImageNet and HF ``imagenet-1k`` order), so one image gets one label whichever copy it is read from.
Sources open files lazily, so they can be pickled into DataLoader worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .bad_images import BadImageError  # noqa: F401  (goyal_recipe.data.sources.BadImageError is public)
from .hf import HFSource
from .images import EncodedImage, read_bytes
from .parquet import HF_SPLITS, ClassList, ParquetSource, find_split_files, parquet_error

KINDS = ("imagefolder", "parquet", "hf")
_FOLDER_SPLITS = {"train": ("train",), "val": ("val", "validation"), "validation": ("val", "validation")}


def _folder_error(problem: str, root) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}; point data.root at an ImageNet copy with train/<synset>/ and val/<synset>/ image folders, "
        f"or run `goyal-data generate {root}`"
    )


class ImageFolderSource(ClassList):
    """ImageNet folder layout ``root_split_dir/<synset>/<image>``; labels follow sorted synsets.

    Files are found as torchvision's ImageFolder finds them (its `find_classes` and `make_dataset`).
    """

    def __init__(self, root_split_dir: str | os.PathLike):
        root = Path(root_split_dir)
        if not root.is_dir():
            raise _folder_error(f"image folder {root} does not exist", root.parent)
        try:
            self.classes, class_to_idx = find_classes(root)
            self.samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError:
            raise _folder_error(f"{root} has no class folders, or a class folder without images", root.parent) from None
        self.root = str(root)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[EncodedImage, int]:
        path, label = self.samples[index]
        return EncodedImage(read_bytes(path), path), label


def build_dataset(kind: str, root: str | os.PathLike, split: str, **kw):
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
                return ImageFolderSource(root / name)
        raise _folder_error(f"{root} has no {_FOLDER_SPLITS[split][0]}/ folder", root)
    if kind == "parquet":
        root = Path(root)
        if not root.exists():
            raise parquet_error(f"data root {root} does not exist", root)
        files = find_split_files(root, split)
        if not files:
            problem = f"{root} has no {HF_SPLITS[split]}-*.parquet shards (looked in parquet/, data/ and itself)"
            raise parquet_error(problem, root)
        return ParquetSource(files, **kw)
    if kind == "hf":
        return HFSource.from_name(root, split, **kw)
    raise ValueError(f"unknown data source kind {kind!r}: choose one of {', '.join(KINDS)}")
