"""Hugging Face `datasets` as a source: a hub name in the local HF cache, or a local copy."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .images import EncodedImage, read_bytes
from .parquet import HF_SPLITS, ClassList, check_labels, find_split_files, parquet_error


@contextlib.contextmanager
def hf_offline(offline: bool = True):
    """Keep `datasets` and `huggingface_hub` off the network inside the block.

    Both read HF_HUB_OFFLINE once, at import, into module constants, and `load_dataset` has no
    per-call switch (DownloadConfig.local_files_only is never read), so those constants are set here
    as well as the environment (which DataLoader workers and subprocesses inherit).
    """
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [(m, name, getattr(m, name)) for m, name in flags if hasattr(m, name)]
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


def load_hf_dataset(name_or_path: str | os.PathLike, split: str, allow_download: bool = False,
                    cache_dir: str | None = None):
    """A `datasets.Dataset` for `split` ("train"/"val") from a local copy or the local HF cache.

    `name_or_path` is a hub name (``ILSVRC/imagenet-1k``), a ``save_to_disk`` directory, or a
    directory of parquet shards. Nothing is downloaded unless `allow_download` is true.
    """
    import datasets

    hf_split = HF_SPLITS.get(split, split)
    path = Path(name_or_path)
    with hf_offline(not allow_download):
        if path.is_dir():
            if (path / "dataset_dict.json").is_file():
                return datasets.load_from_disk(str(path))[hf_split]
            if (path / "state.json").is_file():
                return datasets.load_from_disk(str(path))
            files = find_split_files(path, split)
            if not files:
                raise parquet_error(f"{path} has no {hf_split} shards and no save_to_disk dataset", path)
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


class HFSource(ClassList):
    """A Hugging Face `datasets.Dataset` with an image column and a ClassLabel/int label column.

    Images are read as stored bytes (the column is cast to ``Image(decode=False)``), like the other sources.
    """

    def __init__(self, dataset, classes: list[str] | None = None, image_column: str = "image",
                 label_column: str = "label"):
        import datasets

        feature = dataset.features.get(image_column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        labels = dataset.with_format("arrow", columns=[label_column])[:]  # honours select()/shuffle() indices
        self.targets = labels.column(label_column).to_numpy().astype(np.int64)
        names = getattr(dataset.features.get(label_column), "names", None)
        self.classes = classes or (list(names) if names else None)
        if self.classes is None:
            raise ValueError(f"no class names in the {label_column!r} column of the dataset: pass classes=[...]")
        if len(self.targets) == 0:
            raise ValueError("the Hugging Face dataset split is empty: check the split name and data.root")
        check_labels(self.targets, self.classes, "the dataset")

    @classmethod
    def from_name(cls, name_or_path, split, allow_download=False, cache_dir=None, **kw) -> HFSource:
        return cls(load_hf_dataset(name_or_path, split, allow_download, cache_dir), **kw)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[EncodedImage, int]:
        cell = self.dataset[int(index)][self.image_column]
        data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
        if data is None and path:
            data, name = read_bytes(path), path
        else:
            name = f"{getattr(self.dataset.info, 'dataset_name', None) or 'dataset'} row {int(index)}"
            name += f" ({path})" if path else ""
        return EncodedImage(data, name), int(self.targets[index])
