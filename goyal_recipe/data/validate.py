"""`goyal-data validate ROOT`: decode every image of a dataset once and list those that fail.

Each image is read by the same source as in training and decoded whole by PIL, so a file listed
here is exactly one that `data.bad_images=fail` would stop on (and `skip` would replace).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .bad_images import BadImageError
from .sources import build_dataset

SPLITS = ("train", "val")


class _Probe(Dataset):
    """Decodes sample i; returns "" or "location<TAB>reason" (plain strings cross worker processes)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:
        try:
            image, _ = self.dataset[index]
            image.rgb()
        except BadImageError as e:
            return "\t".join(" ".join(str(x).split()) for x in (e.path, e.reason))  # one TSV row, whatever the text
        return ""


def find_bad_images(root: str | os.PathLike, source: str = "imagefolder", workers: int = 0,
                    progress: bool = True) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Decode every train and val image under `root`; returns ({split: images checked}, [(location, reason)])."""
    checked, bad = {}, []
    for split in SPLITS:
        dataset = build_dataset(source, root, split)
        loader = DataLoader(_Probe(dataset), batch_size=None, num_workers=workers)
        for row in tqdm(loader, total=len(dataset), desc=f"validate {split}", unit="img", disable=not progress,
                        mininterval=1.0):
            if row:
                bad.append(tuple(row.split("\t")))
        checked[split] = len(dataset)
    return checked, bad


def validate_main(argv: list[str] | None = None) -> int:
    """`goyal-data validate ROOT [--source S] [--out FILE] [--workers N]`: 0 if every image decodes, 1 if not."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="goyal-data validate",
        description="Decode every train and val image under ROOT once; list the files that cannot be decoded "
                    "(path<TAB>reason) and exit 1 if there are any.",
    )
    parser.add_argument("root", metavar="ROOT")
    parser.add_argument("--source", choices=("imagefolder", "parquet"), default="imagefolder")
    parser.add_argument("--out", default="bad_files.txt", help="TSV of bad files, path<TAB>reason (default bad_files.txt)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this process)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.exit(2, f"goyal-data validate: error: --workers must be >= 0, got {args.workers}\n")
    try:
        checked, bad = find_bad_images(args.root, args.source, args.workers)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"goyal-data validate: error: {e}\n")
    # Written even when empty, so an old list never stands for this check.
    Path(args.out).write_text("".join(f"{path}\t{reason}\n" for path, reason in bad))
    total = sum(checked.values())
    print(f"{args.root}: {total} images checked ({', '.join(f'{n} {s}' for s, n in checked.items())}), "
          f"{len(bad)} bad" + (f", listed in {args.out}" if bad else ""))
    return 1 if bad else 0
