"""`goyal-data prepare-imagenet SRC DST`: the official ILSVRC2012 archives as the folders the trainer reads.

SRC holds the three files image-net.org distributes: ILSVRC2012_img_train.tar (a tar of one tar
per class, n01440764.tar ...), ILSVRC2012_img_val.tar (ILSVRC2012_val_00000001.JPEG ... flat) and
ILSVRC2012_devkit_t12.tar.gz (data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt).
DST becomes ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, the layout of `data.source=imagefolder`.

The parsing is torchvision's own (`torchvision.datasets.imagenet`): it checks each archive's MD5
against the official one, reads the devkit's class table and validation labels, and extracts. Its
functions run with DST as their root, with the archives linked in rather than copied, so their
extraction is already the final layout: the validation images are renamed into class folders and
each class tar is extracted and deleted in turn. Free space needed in DST: about the size of the
two image archives.

Before anything is written, the archives' indexes are read (names only) and checked against the
official layout, so a wrong or incomplete archive stops at once with one line instead of leaving
a half-extracted DST; any failure later removes what was written. Afterwards every image is decoded
once with progress (`goyal-data validate`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from torchvision.datasets import imagenet

from ..errors import UserError
from .validate import find_bad_images

ARCHIVES = {split: name for split, (name, _md5) in imagenet.ARCHIVE_META.items()}  # train, val, devkit
_DEVKIT_ROOT = "ILSVRC2012_devkit_t12"
_DEVKIT_FILES = (f"{_DEVKIT_ROOT}/data/meta.mat", f"{_DEVKIT_ROOT}/data/ILSVRC2012_validation_ground_truth.txt")
_CLASS_TAR = re.compile(r"(n\d{8})\.tar")
_VAL_IMAGE = "ILSVRC2012_val_{:08d}.JPEG"
_VAL_PATTERN = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG")
_DOWNLOAD = "download it again from https://image-net.org/challenges/LSVRC/2012/2012-downloads.php"


class ArchiveError(UserError):
    """An ILSVRC2012 archive that is missing, unreadable or not laid out as the official one."""


def prepare_imagenet(src: str | os.PathLike, dst: str | os.PathLike, progress: bool = True) -> dict:
    """Extract the official archives in `src` into the folder layout under `dst`; returns counts.

    `dst` must not exist or be empty. Returns {"classes", "train_images", "val_images"}.
    """
    src, dst = Path(src), Path(dst)
    paths = {split: src / name for split, name in ARCHIVES.items()}
    missing = [name for split, name in ARCHIVES.items() if not paths[split].is_file()]
    if missing:
        raise ArchiveError(f"{src} lacks {', '.join(missing)}: put the official ILSVRC2012 archives "
                           f"({', '.join(ARCHIVES.values())}) there")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ArchiveError(f"{dst} is not an empty directory: give prepare-imagenet a new or empty DST")

    train_images = _train_index(paths["train"])
    val_names = _val_index(paths["val"])
    _check_devkit_index(paths["devkit"])
    wnid_to_words, val_wnids = _parse_devkit(paths["devkit"])
    _check_consistent(train_images, val_names, wnid_to_words, val_wnids)

    _say(progress, f"{len(train_images)} classes, {sum(train_images.values())} training and "
                   f"{len(val_names)} validation images; extracting into {dst}")
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    links = [dst / ARCHIVES[split] for split in ("val", "train")]
    try:
        for split in ("val", "train"):
            os.symlink(paths[split].resolve(), dst / ARCHIVES[split])
        _extract(imagenet.parse_val_archive, dst, "val", wnids=val_wnids)
        _say(progress, f"validation images in {dst / 'val'}")
        _extract(imagenet.parse_train_archive, dst, "train")
        _say(progress, f"training images in {dst / 'train'}")
    except BaseException:
        _remove_contents(dst, created)
        raise
    finally:
        for link in links:
            if link.is_symlink():
                link.unlink()
    return {"classes": len(train_images), "train_images": sum(train_images.values()), "val_images": len(val_names)}


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"prepare-imagenet: {message}", flush=True)


def _members(path: Path, mode: str = "r:") -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(path, mode) as tar:
            return tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"{path} is not a readable tar archive ({e}); {_DOWNLOAD}") from None


def _train_index(path: Path) -> dict[str, int]:
    """{wnid: images} from the names in the train tar and in each class tar inside it (nothing extracted)."""
    images = {}
    try:
        with tarfile.open(path, "r:") as outer:
            for member in outer:
                match = _CLASS_TAR.fullmatch(member.name)
                if not (match and member.isfile()):
                    raise ArchiveError(f"{path} holds {member.name!r}, not a class tar such as n01440764.tar: "
                                       f"not the official {path.name}; {_DOWNLOAD}")
                wnid = match.group(1)
                image = re.compile(rf"{wnid}_\d+\.JPEG")
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    members = inner.getmembers()
                wrong = [m.name for m in members if not (m.isfile() and image.fullmatch(m.name))]
                if wrong or not members:
                    found = f"holds {wrong[0]!r}" if wrong else "is empty"
                    raise ArchiveError(f"{path}: {member.name} {found}, not flat {wnid}_<number>.JPEG images: "
                                       f"not the official {path.name}; {_DOWNLOAD}")
                images[wnid] = len(members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"{path} is not a readable tar of class tars ({e}); {_DOWNLOAD}") from None
    if not images:
        raise ArchiveError(f"{path} holds no class tars: not the official {path.name}; {_DOWNLOAD}")
    return images


def _val_index(path: Path) -> list[str]:
    members = _members(path)
    wrong = [m.name for m in members if not (m.isfile() and _VAL_PATTERN.fullmatch(m.name))]
    if wrong:
        raise ArchiveError(f"{path} holds {wrong[0]!r}, not a flat ILSVRC2012_val_<8 digits>.JPEG image: "
                           f"not the official {path.name}; {_DOWNLOAD}")
    return [m.name for m in members]


def _check_devkit_index(path: Path) -> None:
    names = {m.name: m for m in _members(path, "r:gz")}
    outside = [n for n, m in names.items()
               if n.split("/")[0] != _DEVKIT_ROOT or ".." in n.split("/") or not (m.isfile() or m.isdir())]
    absent = [f for f in _DEVKIT_FILES if f not in names or not names[f].isfile()]
    if outside or absent:
        problem = f"holds {outside[0]!r}, not a file or folder in {_DEVKIT_ROOT}/" if outside else f"lacks {absent[0]}"
        raise ArchiveError(f"{path} {problem}: not the official {path.name}; {_DOWNLOAD}")


def _parse_devkit(path: Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """torchvision's devkit parsing (class table and validation labels, after its MD5 check), run on
    a link to the archive in a scratch directory so that SRC and DST stay untouched."""
    with tempfile.TemporaryDirectory() as scratch:
        os.symlink(path.resolve(), Path(scratch) / path.name)
        try:
            imagenet.parse_devkit_archive(scratch, path.name)
        except RuntimeError:
            raise ArchiveError(_checksum_message(path, "devkit")) from None
        except Exception as e:  # noqa: BLE001 - anything raised here comes from a meta.mat or label file unlike the official
            raise ArchiveError(f"{path}: torchvision cannot read its class table or validation labels "
                               f"({type(e).__name__}: {e}); {_DOWNLOAD}") from None
        return imagenet.load_meta_file(scratch)


def _check_consistent(train_images: dict[str, int], val_names: list[str],
                      wnid_to_words: dict[str, tuple[str, ...]], val_wnids: list[str]) -> None:
    classes = set(wnid_to_words)
    if set(train_images) != classes:
        odd = sorted(set(train_images) ^ classes)[0]
        raise ArchiveError(f"the train archive's classes differ from the devkit's (e.g. {odd}): "
                           f"archives from different releases; {_DOWNLOAD}")
    # torchvision pairs the sorted image names with the ground-truth lines in order: the names must
    # be exactly 1..N or every label after a gap would be shifted.
    expected = [_VAL_IMAGE.format(i) for i in range(1, len(val_wnids) + 1)]
    if sorted(val_names) != expected:
        raise ArchiveError(f"the validation archive holds {len(val_names)} images, the devkit labels {len(val_wnids)}: "
                           f"they must be ILSVRC2012_val_00000001.JPEG to {expected[-1] if expected else '(none)'}; "
                           f"incomplete or mismatched archives; {_DOWNLOAD}")
    unknown = set(val_wnids) - classes
    if unknown:
        raise ArchiveError(f"the devkit labels validation images with {sorted(unknown)[0]}, not one of its classes; "
                           f"{_DOWNLOAD}")


def _extract(parse, root: Path, split: str, **kwargs) -> None:
    try:
        parse(str(root), **kwargs)
    except RuntimeError:  # torchvision's MD5 check; every name was checked before, so nothing else raises it
        raise ArchiveError(_checksum_message(root / ARCHIVES[split], split)) from None


def _checksum_message(path: Path, split: str) -> str:
    name, md5 = imagenet.ARCHIVE_META[split]
    return (f"{path.resolve()} does not have the MD5 of the official {name} ({md5}): a corrupt or repacked "
            f"download; {_DOWNLOAD}")


def _remove_contents(dst: Path, created: bool) -> None:
    """Back to what was there before: no DST, or an empty one."""
    if created:
        shutil.rmtree(dst, ignore_errors=True)
        return
    for entry in dst.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def prepare_main(argv: list[str] | None = None) -> int:
    """`goyal-data prepare-imagenet SRC DST [--workers N] [--out FILE]`: 0 when every image decodes, 1 if not."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="goyal-data prepare-imagenet",
        description="Extract the official ILSVRC2012 archives in SRC (" + ", ".join(ARCHIVES.values()) + ") into "
                    "DST/train/<wnid>/*.JPEG and DST/val/<wnid>/*.JPEG, then decode every image once.",
    )
    parser.add_argument("src", metavar="SRC", help="directory holding the three official archives")
    parser.add_argument("dst", metavar="DST", help="new or empty directory for the image folders (data.root)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes for the check (default 0)")
    parser.add_argument("--out", default="bad_files.txt", help="TSV of undecodable files, path<TAB>reason")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.exit(2, f"goyal-data prepare-imagenet: error: --workers must be >= 0, got {args.workers}\n")
    counts = prepare_imagenet(args.src, args.dst)
    checked, bad = find_bad_images(args.dst, "imagefolder", args.workers)
    if (checked["train"], checked["val"]) != (counts["train_images"], counts["val_images"]):
        raise RuntimeError(f"{args.dst} holds {checked} images after extraction, the archives {counts}")
    Path(args.out).write_text("".join(f"{path}\t{reason}\n" for path, reason in bad))
    print(f"{args.dst}: {counts['classes']} classes, {checked['train']} train and {checked['val']} val images, "
          f"{len(bad)} that do not decode" + (f", listed in {args.out}" if bad else ""))
    return 1 if bad else 0
