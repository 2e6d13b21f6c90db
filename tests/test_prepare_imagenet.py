"""`goyal-data prepare-imagenet` on a miniature of the official ILSVRC2012 archives."""

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from scipy import io as scipy_io
from torchvision.datasets import imagenet
from torchvision.datasets.utils import calculate_md5

from _loop import run_local
from _runs import records, samples_by_epoch
from goyal_recipe.cli import data_main
from goyal_recipe.data.generate import generate_dataset

# The first four ILSVRC2012 synsets. The devkit numbers them out of sorted order (3, 1, 4, 2), so a
# label taken from a position instead of meta.mat's table would land in the wrong folder.
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
IDS = [3, 1, 4, 2]
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3
MAT_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")  # meta.mat's synsets struct, in the devkit's field order


def _tar_bytes(files: dict[str, bytes], mode="w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _meta_mat(extra_synsets=()) -> bytes:
    """The devkit's meta.mat: the leaf synsets, then a parent (num_children > 0) that torchvision drops."""
    rows = [(i, w, f"class {w}, synonym", "gloss", 0, np.zeros(0), 0, TRAIN_PER_CLASS) for i, w in zip(IDS, WNIDS)]
    rows += [(len(IDS) + 1, "n00001740", "entity", "gloss", 2, np.array([1, 2]), 5, 0), *extra_synsets]
    synsets = np.empty(len(rows), dtype=[(f, object) for f in MAT_FIELDS])
    for i, row in enumerate(rows):
        synsets[i] = row
    buffer = io.BytesIO()
    scipy_io.savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def write_archives(src: Path, images: Path, *, train_members=None, val_names=None, devkit_files=None) -> dict:
    """The three official archives from a generated image folder; returns {wnid: {split: [bytes]}}.

    Validation images of all classes are interleaved (class of image i: a fixed permutation) and
    numbered from 1 as ILSVRC2012_val_<8 digits>.JPEG; line i of the ground truth is its class's ID.
    """
    src.mkdir(parents=True)
    by_class = {w: {s: [p.read_bytes() for p in sorted((images / s / f"n{c:08d}").iterdir())] for s in ("train", "val")}
                for c, w in enumerate(WNIDS)}
    class_tars = {f"{w}.tar": _tar_bytes({f"{w}_{k + 1}.JPEG": d for k, d in enumerate(by_class[w]["train"])})
                  for w in WNIDS}
    (src / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(class_tars if train_members is None else train_members))
    order = np.random.default_rng(0).permutation([c for c in range(len(WNIDS)) for _ in range(VAL_PER_CLASS)])
    taken = {c: iter(by_class[WNIDS[c]]["val"]) for c in range(len(WNIDS))}
    val = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": next(taken[c]) for i, c in enumerate(order)}
    if val_names is not None:
        val = dict(zip(val_names, val.values()))
    (src / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes(val))
    truth = "".join(f"{IDS[c]}\n" for c in order).encode()
    devkit = {"ILSVRC2012_devkit_t12/data/meta.mat": _meta_mat(),
              "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth,
              "ILSVRC2012_devkit_t12/readme.txt": b"devkit\n"}
    (src / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(_tar_bytes(devkit if devkit_files is None else devkit_files,
                                                                  "w:gz"))
    expected_val = {w: [] for w in WNIDS}
    for (name, data), c in zip(val.items(), order):
        expected_val[WNIDS[c]].append((name, data))
    return {w: {"train": by_class[w]["train"], "val": expected_val[w]} for w in WNIDS}


def _official(monkeypatch, src: Path):
    """The miniature's MD5s stand in for the official ones torchvision checks."""
    for split, (name, _) in list(imagenet.ARCHIVE_META.items()):
        monkeypatch.setitem(imagenet.ARCHIVE_META, split, (name, calculate_md5(src / name)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    generate_dataset(root, num_classes=len(WNIDS), train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                     image_size=(32, 24), seed=3, formats=("jpeg",), workers=1)
    return root


def test_prepare_imagenet_puts_every_image_under_its_class_and_the_trainer_reads_it(images, tmp_path, monkeypatch,
                                                                                     capsys):
    src, dst = tmp_path / "src", tmp_path / "imagenet"
    expected = write_archives(src, images)
    _official(monkeypatch, src)
    archives = {p.name: p.read_bytes() for p in src.iterdir()}

    assert data_main(["prepare-imagenet", str(src), str(dst), "--out", str(tmp_path / "bad.tsv")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"{dst}: 4 classes, 32 train and 12 val images, 0 that do not decode"
    assert sorted(p.name for p in dst.iterdir()) == ["train", "val"]  # no archive links, tars or meta.bin left
    for split in ("train", "val"):
        assert sorted(p.name for p in (dst / split).iterdir()) == WNIDS
    for wnid, split_images in expected.items():
        train_files = sorted((dst / "train" / wnid).iterdir(), key=lambda p: int(p.stem.split("_")[1]))
        assert [p.name for p in train_files] == [f"{wnid}_{k + 1}.JPEG" for k in range(TRAIN_PER_CLASS)]
        assert [p.read_bytes() for p in train_files] == split_images["train"]
        val_files = sorted((dst / "val" / wnid).iterdir())
        assert [(p.name, p.read_bytes()) for p in val_files] == sorted(split_images["val"])
        assert len(val_files) == VAL_PER_CLASS
    assert {p.name: p.read_bytes() for p in src.iterdir()} == archives  # SRC untouched
    assert (tmp_path / "bad.tsv").read_text() == ""

    run = tmp_path / "runs"
    run_local(dst, run, "imagenet", **{"run.max_updates": 1})  # the trainer in this process (engine=local)
    steps = records(run / "imagenet", "step")
    assert [(r["update"], r["epoch"]) for r in steps] == [(1, 0.5)]  # 32 training images, kn = 16
    samples = samples_by_epoch(run / "imagenet", [0])[0]
    assert len(set(samples)) == 16 and set(samples) <= set(range(32))
    weights = load_file(run / "imagenet" / "checkpoints" / "update_000000001" / "model.safetensors")
    assert weights["fc.weight"].shape[0] == len(WNIDS)


def _bad_devkit():
    return {"ILSVRC2012_devkit_t12/data/meta.mat": _meta_mat()}


@pytest.mark.parametrize("case,message", [
    ("missing", r"src lacks ILSVRC2012_img_val\.tar: put the official ILSVRC2012 archives"),
    ("dst not empty", r"imagenet is not an empty directory: give prepare-imagenet a new or empty DST"),
    ("train member", r"ILSVRC2012_img_train\.tar holds 'README', not a class tar such as n01440764\.tar"),
    ("class member", r"n01440764\.tar holds 'images/n01440764_1\.JPEG', not flat n01440764_<number>\.JPEG"),
    ("val member", r"ILSVRC2012_img_val\.tar holds 'val/ILSVRC2012_val_00000001\.JPEG', not a flat"),
    ("val gap", r"the validation archive holds 12 images, the devkit labels 12: they must be "
                r"ILSVRC2012_val_00000001\.JPEG to ILSVRC2012_val_00000012\.JPEG"),
    ("devkit", r"ILSVRC2012_devkit_t12\.tar\.gz lacks ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground"),
    ("checksum", r"ILSVRC2012_img_train\.tar does not have the MD5 of the official ILSVRC2012_img_train\.tar "
                 r"\(1d675b47d978889d74fa0da5fadfb00e\): a corrupt or repacked download"),
])
def test_bad_archives_stop_with_one_line_and_leave_dst_as_it_was(images, tmp_path, monkeypatch, capsys, case,
                                                                 message):
    src, dst = tmp_path / "src", tmp_path / "imagenet"
    kwargs = {
        "train member": {"train_members": {"README": b"x"}},
        "class member": {"train_members": {f"{w}.tar": _tar_bytes({f"images/{w}_1.JPEG": b"x"}) for w in WNIDS}},
        "val member": {"val_names": [f"val/ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 13)]},
        "val gap": {"val_names": [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(2, 14)]},
        "devkit": {"devkit_files": _bad_devkit()},
    }.get(case, {})
    write_archives(src, images, **kwargs)
    if case != "checksum":
        _official(monkeypatch, src)
    else:  # the official devkit and validation checksums hold, the train archive's does not
        for split in ("val", "devkit"):
            name = imagenet.ARCHIVE_META[split][0]
            monkeypatch.setitem(imagenet.ARCHIVE_META, split, (name, calculate_md5(src / name)))
    if case == "missing":
        (src / "ILSVRC2012_img_val.tar").unlink()
    if case == "dst not empty":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    assert data_main(["prepare-imagenet", str(src), str(dst), "--out", str(tmp_path / "bad.tsv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("goyal-data: error: "), err
    assert re.search(message, err), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing new on disk
