"""Deterministic synthetic image classification data in ImageNet's file formats.

The images are drawn by data/render.py from a seed. Written as ImageNet JPEG folders
(``train/<synset>/<synset>_<index>.JPEG``) and as Hugging Face ``imagenet-1k`` style parquet
shards (``parquet/train-00000-of-0000N.parquet``, columns ``image`` {bytes, path} and ``label``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from .render import class_images

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("jpeg", "parquet")
SPLITS = (("train", "train"), ("val", "validation"))  # (folder name, parquet / HF split name)
GENERATOR_VERSION = 1  # bump when the pixels change, so DONE records from older code are regenerated
DONE_FILE = "DONE"
_GENERATING_FILE = "GENERATING"
_PARQUET_ROWS_PER_SHARD = 1000
_PARQUET_ROW_GROUP_SIZE = 64  # small row groups keep random access cheap (one group read per sample)


def synset_names(num_classes: int) -> list[str]:
    """Synset-like class ids; sorted order equals label index."""
    return [f"n{i:08d}" for i in range(num_classes)]


def _ordered_map(fn, args_list, workers):
    """fn over args_list on `workers` threads, results in order, at most 2 x workers pending.

    numpy and PIL's JPEG encoder release the GIL, so threads scale; every task has its own seeded
    generator, so the output does not depend on scheduling.
    """
    if workers <= 1:
        yield from (fn(*a) for a in args_list)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for a in args_list:
            pending.append(pool.submit(fn, *a))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _hf_schema(classes: list[str]) -> pa.Schema:
    import pyarrow as pa  # here, not at import: training on image folders never needs it

    # The "huggingface" metadata is how `datasets` restores Image() / ClassLabel features from parquet.
    features = {
        "image": {"_type": "Image"},
        "label": {"names": classes, "_type": "ClassLabel"},
    }
    return pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.int64()),
        ],
        metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()},
    )


class _ShardWriter:
    """Streams rows into `<split>-XXXXX-of-YYYYY.parquet` files of a known total row count."""

    def __init__(self, directory: Path, split: str, total_rows: int, schema: pa.Schema):
        self.directory, self.split, self.schema = directory, split, schema
        self.num_shards = max(1, math.ceil(total_rows / _PARQUET_ROWS_PER_SHARD))
        self.shard, self.writer, self.rows_in_shard = 0, None, 0
        self.pending: list[tuple[bytes, str, int]] = []
        self.files: list[str] = []

    def add(self, data: bytes, path: str, label: int) -> None:
        if self.writer is None:
            name = f"{self.split}-{self.shard:05d}-of-{self.num_shards:05d}.parquet"
            self.files.append(name)
            import pyarrow.parquet as pq

            self.writer = pq.ParquetWriter(self.directory / name, self.schema)
        self.pending.append((data, path, label))
        self.rows_in_shard += 1
        if len(self.pending) == _PARQUET_ROW_GROUP_SIZE:
            self._flush()
        if self.rows_in_shard == _PARQUET_ROWS_PER_SHARD:
            self.close()
            self.shard += 1

    def _flush(self) -> None:
        if self.pending:
            images = [{"bytes": b, "path": p} for b, p, _ in self.pending]
            labels = [lab for _, _, lab in self.pending]
            import pyarrow as pa

            self.writer.write_table(pa.Table.from_pydict({"image": images, "label": labels}, schema=self.schema))
            self.pending = []

    def close(self) -> None:
        if self.writer is not None:
            self._flush()
            self.writer.close()
            self.writer, self.rows_in_shard = None, 0


def _params(num_classes, train_per_class, val_per_class, image_size, seed, formats, difficulty, jpeg_quality):
    return {
        "generator_version": GENERATOR_VERSION,
        "num_classes": int(num_classes),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "seed": int(seed),
        "formats": sorted(formats),
        "difficulty": float(difficulty),
        "jpeg_quality": int(jpeg_quality),
    }


def _check_args(num_classes, train_per_class, val_per_class, image_size, formats, difficulty, jpeg_quality):
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {tuple(formats)}")
    if num_classes < 1 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("num_classes, train_per_class and val_per_class must all be >= 1")
    if len(image_size) != 2 or min(image_size) < 8:
        raise ValueError(f"image_size must be (width, height) with both >= 8, got {image_size}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")


def read_done(root: str | os.PathLike) -> dict | None:
    """The DONE record of a completed generation under `root`, or None."""
    path = Path(root) / DONE_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _clear_outputs(root: Path) -> None:
    ours = [root / "train", root / "val", root / "parquet", root / "synsets.txt"]
    marked = (root / DONE_FILE).exists() or (root / _GENERATING_FILE).exists()
    if not marked and any(p.exists() for p in ours):
        raise FileExistsError(
            f"{root} already holds train/, val/ or parquet/ not written by `goyal-data generate`; "
            "choose an empty directory"
        )
    (root / DONE_FILE).unlink(missing_ok=True)
    for p in ours:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def generate_dataset(
    root: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    image_size: tuple[int, int] = (64, 48),
    seed: int = 0,
    formats: tuple[str, ...] | list[str] = FORMATS,
    difficulty: float = 0.5,
    jpeg_quality: int = 90,
    workers: int | None = None,
) -> dict:
    """Write the synthetic dataset under `root` (image_size is (width, height)) and return a summary.

    Idempotent: returns at once when `root/DONE` records the same parameters; otherwise removes
    its own earlier outputs and regenerates. Same arguments give byte-identical files.
    `workers` threads render classes in parallel (default: CPU count, at most 8); the output does
    not depend on it. Not safe to call from several processes at once on one root: call it on the
    main process.
    """
    formats = tuple(formats)
    _check_args(num_classes, train_per_class, val_per_class, image_size, formats, difficulty, jpeg_quality)
    root = Path(root)
    params = _params(num_classes, train_per_class, val_per_class, image_size, seed, formats, difficulty, jpeg_quality)
    done = read_done(root)
    if done is not None and done.get("params") == params:
        return {**done, "root": str(root), "generated": False, "seconds": 0.0}

    start = time.perf_counter()
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    root.mkdir(parents=True, exist_ok=True)
    _clear_outputs(root)
    (root / _GENERATING_FILE).write_text(json.dumps(params))

    width, height = params["image_size"]
    classes = synset_names(num_classes)
    (root / "synsets.txt").write_text("".join(c + "\n" for c in classes))
    counts, parquet_files, total_bytes = {}, {}, 0
    schema = _hf_schema(classes)
    for split_id, ((folder, hf_split), per_class) in enumerate(zip(SPLITS, (train_per_class, val_per_class))):
        writer = None
        if "parquet" in formats:
            (root / "parquet").mkdir(exist_ok=True)
            writer = _ShardWriter(root / "parquet", hf_split, num_classes * per_class, schema)
        digits = max(5, len(str(per_class - 1)))  # zero padding: file name order == generation order
        tasks = [
            (seed, label, split_id + 1, per_class, width, height, difficulty, jpeg_quality)
            for label in range(num_classes)
        ]
        for label, images in enumerate(_ordered_map(class_images, tasks, workers)):
            synset = classes[label]
            class_dir = root / folder / synset
            if "jpeg" in formats:
                class_dir.mkdir(parents=True, exist_ok=True)
            for index, data in enumerate(images):
                name = f"{synset}_{index:0{digits}d}.JPEG"
                total_bytes += len(data)
                if "jpeg" in formats:
                    (class_dir / name).write_bytes(data)
                if writer is not None:
                    writer.add(data, name, label)
        if writer is not None:
            writer.close()
            parquet_files[hf_split] = writer.files
        counts[folder] = num_classes * per_class

    record = {
        "params": params,
        "classes": num_classes,
        "images": counts,
        "jpeg_bytes": total_bytes,
        "parquet_files": parquet_files,
    }
    # DONE is written last and atomically: its presence means every other file is complete.
    tmp = root / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / DONE_FILE)
    (root / _GENERATING_FILE).unlink()
    return {**record, "root": str(root), "generated": True, "seconds": time.perf_counter() - start}


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 64x48, got {text!r}") from None


def generate_main(argv: list[str] | None = None) -> int:
    """`goyal-data generate ROOT [options]`; accepts argv with or without the leading 'generate'."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="goyal-data generate", description="Write the synthetic ImageNet-format dataset under ROOT."
    )
    parser.add_argument("root", metavar="ROOT")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--train-per-class", type=int, default=100, help="train images per class (default 100)")
    parser.add_argument("--val-per-class", type=int, default=20, help="val images per class (default 20)")
    parser.add_argument("--image-size", type=_image_size, default=(64, 48), help="WIDTHxHEIGHT (default 64x48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=float, default=0.5, help="0 (easy) to 1 (hard), default 0.5")
    parser.add_argument("--formats", default="jpeg,parquet", help="comma list of jpeg,parquet (default both)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    args = parser.parse_args(argv)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    try:
        s = generate_dataset(
            args.root,
            num_classes=args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            image_size=args.image_size,
            seed=args.seed,
            formats=formats,
            difficulty=args.difficulty,
            jpeg_quality=args.jpeg_quality,
        )
    except (ValueError, FileExistsError) as err:
        parser.exit(2, f"goyal-data generate: error: {err}\n")
    w, h = s["params"]["image_size"]
    state = f"generated in {s['seconds']:.1f}s" if s["generated"] else "already complete"
    print(
        f"{s['root']}: {s['classes']} classes, {s['images']['train']} train + {s['images']['val']} val images, "
        f"{w}x{h}, difficulty {s['params']['difficulty']:g}, seed {s['params']['seed']}, "
        f"formats {','.join(s['params']['formats'])}, {s['jpeg_bytes'] / 2**20:.1f} MiB JPEG ({state})"
    )
    return 0
