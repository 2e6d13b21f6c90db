"""Bad images: convertible ones train, undecodable ones fail or are replaced; `goyal-data validate` lists them."""

import gc
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from goyal_recipe.cli import data_main
from goyal_recipe.config import load_config, plan_batches
from goyal_recipe.data import (BadImageError, BadImages, HFSource, SampleReader, TrainDecode, build_dataset,
                               build_loader, decode_rgb, generate_dataset)
from goyal_recipe.data.generate import _hf_schema, synset_names
from goyal_recipe.data.pipeline import EpochTaggedSampler, build_data
from goyal_recipe.data.validate import validate_main
from goyal_recipe.sampler import EpochShuffleSampler

SMALL = dict(num_classes=3, train_per_class=6, val_per_class=2, image_size=(40, 30))
SIZE = 16  # training crop of the tests


def _encode(image, fmt="JPEG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _bomb(jpeg: bytes) -> bytes:
    """The JPEG with a 65000 x 65000 frame header: 4.2 G pixels, over PIL's default limit."""
    data, i = bytearray(jpeg), 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):  # walk the marker segments to the frame header
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = (65000).to_bytes(2, "big") * 2
    return bytes(data)


def _files(jpeg: bytes):
    rgb = Image.open(io.BytesIO(jpeg)).convert("RGB")
    convertible = {
        "png": _encode(rgb, "PNG"),  # ImageNet has a PNG named .JPEG, CMYK and grayscale JPEGs
        "cmyk": _encode(rgb.convert("CMYK")),
        "gray": _encode(rgb.convert("L")),
        "tiny": _encode(rgb.resize((1, 1))),
    }
    undecodable = {
        "zero": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "random": bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0)).tolist()),
        "bomb": _bomb(jpeg),
    }
    return convertible, undecodable


# Where each salted file goes: (split, class, file name). "random" sorts last of the last class, so
# its substitute wraps around to sample 0; "truncated" and "zero" are neighbours (two skips in a row).
PLACES = {
    "png": ("train", 0, "n00000000_00002a_png.JPEG"),
    "cmyk": ("train", 1, "n00000001_00000a_cmyk.JPEG"),
    "gray": ("train", 1, "n00000001_00003a_gray.JPEG"),
    "tiny": ("train", 2, "n00000002_00001a_tiny.JPEG"),
    "zero": ("train", 1, "n00000001_00001b_zero.JPEG"),
    "truncated": ("train", 1, "n00000001_00001a_truncated.JPEG"),
    "bomb": ("train", 0, "n00000000_00004a_bomb.JPEG"),
    "random": ("train", 2, "n00000002_99999_random.JPEG"),
}
VAL_BAD = ("val", 1, "n00000001_00000a_zero.JPEG")
UNDECODABLE = ("zero", "truncated", "random", "bomb")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A clean generated dataset, and a copy salted with the bad files, as folders and parquet."""
    base = tmp_path_factory.mktemp("faults")
    clean, salted = base / "clean", base / "salted"
    generate_dataset(clean, **SMALL)
    shutil.copytree(clean, salted)
    convertible, undecodable = _files((clean / "train/n00000000/n00000000_00000.JPEG").read_bytes())
    payload = {**convertible, **undecodable}
    classes = synset_names(SMALL["num_classes"])
    for kind, (split, label, name) in [*PLACES.items(), ("zero", VAL_BAD)]:
        (salted / split / classes[label] / name).write_bytes(payload[kind])
    # Parquet: the same rows as the folder (sorted by class, then name), in row groups of 4.
    for split, hf_split in (("train", "train"), ("val", "validation")):
        files = sorted((p.parent.name, p.name, p) for p in (salted / split).rglob("*.JPEG"))
        rows = {"image": [{"bytes": p.read_bytes(), "path": n} for _, n, p in files],
                "label": [classes.index(c) for c, _, _ in files]}
        shard = salted / "parquet" / f"{hf_split}-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pydict(rows, schema=_hf_schema(classes)), shard, row_group_size=4)
    return SimpleNamespace(clean=clean, salted=salted, convertible=convertible, undecodable=undecodable)


def _names(dataset) -> list[str]:
    if hasattr(dataset, "samples"):
        return [Path(p).name for p, _ in dataset.samples]
    return [dataset.location(i).split(" (")[1].rstrip(")") for i in range(len(dataset))]


def _bad_indices(dataset) -> list[int]:
    bad_names = {PLACES[k][2] for k in UNDECODABLE}
    return [i for i, name in enumerate(_names(dataset)) if name in bad_names]


@pytest.fixture(params=["imagefolder", "parquet"])
def train_set(request, roots):
    return build_dataset(request.param, roots.salted, "train")


def reader(source, bad_images: str, seed: int = 0) -> SampleReader:
    return SampleReader(source, TrainDecode(SIZE), BadImages(bad_images), seed)


def test_convertible_images_load_as_rgb_tensors(train_set):
    names = _names(train_set)
    for kind in ("png", "cmyk", "gray", "tiny"):
        i = names.index(PLACES[kind][2])
        (pixels, _), label, index, bad = reader(train_set, "fail")[(0, i)]
        assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.uint8, kind
        assert (label, index, bad) == (PLACES[kind][1], i, 0), kind


def test_fail_stops_at_the_first_bad_image_naming_it(train_set):
    dataset = reader(train_set, "fail")
    first = _bad_indices(train_set)[0]
    for i in range(first):
        dataset[(0, i)]
    with pytest.raises(BadImageError) as err:
        dataset[(0, first)]
    message = str(err.value)
    assert "\n" not in message and PLACES["bomb"][2] in message and "decompression bomb" in message
    assert PLACES["bomb"][2] in err.value.path and "data.bad_images=skip" in message


def test_fail_crosses_dataloader_workers_as_one_line(train_set, monkeypatch):
    # torch joins the workers of a loader that raised with a 5 s timeout each; shorten it for the test.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    dataset = reader(train_set, "fail")
    order = [(0, i) for i in range(len(train_set))]
    batches = iter(build_loader(dataset, order, batch_size=4, num_workers=2, persistent_workers=False))
    with pytest.raises(BadImageError) as err:
        list(batches)
    message = str(err.value)
    del batches, err
    gc.collect()  # shut the workers down now, under the short timeout
    assert "\n" not in message and message.startswith("cannot decode image ")
    assert PLACES["bomb"][2] in message  # batches come back in order: the first bad one is reported


def _pass(dataset, ranks: int, workers: int) -> dict[int, tuple]:
    seen = {}
    for rank in range(ranks):
        sampler = EpochShuffleSampler(len(dataset), ranks, rank, seed=3, drop_last=False, batch_size=4)
        sampler.set_epoch(1)
        loader = build_loader(reader(dataset, "skip", seed=3), EpochTaggedSampler(sampler),
                              batch_size=4, num_workers=workers, persistent_workers=False, worker_seed=rank)
        for (images, _), labels, index, bad in loader:
            for k, i in enumerate(index.tolist()):
                assert i not in seen  # nothing twice
                seen[i] = (images[k], int(labels[k]), int(bad[k]))
    return seen


def test_skip_substitutes_deterministically_and_counts(train_set):
    one = _pass(train_set, ranks=1, workers=0)
    two = _pass(train_set, ranks=2, workers=2)  # other world size, other worker processes
    assert sorted(one) == list(range(len(train_set)))  # the epoch keeps its sample count
    bad = _bad_indices(train_set)
    assert [i for i, (_, _, b) in sorted(one.items()) if b] == bad
    assert sum(b for _, _, b in one.values()) == len(UNDECODABLE)
    for i in one:
        assert torch.equal(one[i][0], two[i][0]) and one[i][1:] == two[i][1:], i
    # The substitute is the next sample (cyclically) that decodes, with its own label.
    n, targets = len(train_set), list(train_set.targets)
    for i in bad:
        j = next((i + s) % n for s in range(1, n) if (i + s) % n not in bad)
        assert one[i][1] == targets[j]
    assert bad[-1] == n - 1 and one[n - 1][1] == targets[0]  # the last sample wraps to the first


def test_each_run_warns_once_per_bad_image(train_set, caplog):
    bad = _bad_indices(train_set)
    with caplog.at_level("WARNING", logger="goyal_recipe.data.bad_images"):
        for _run in range(2):  # the policy's state is the run's: a second run warns again
            run_reader = reader(train_set, "skip")
            for epoch in range(3):
                assert [run_reader[(epoch, i)][3] for i in bad] == [1] * len(bad)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad image")]
    assert len(warnings) == 2 * len(bad) == 8
    assert sorted(set(warnings)) == sorted(warnings[:4]) and warnings[:4] == warnings[4:]


def test_hf_source_follows_the_policy(roots):
    datasets = pytest.importorskip("datasets")
    convertible, undecodable = roots.convertible, roots.undecodable
    rows = [("gray.JPEG", convertible["gray"]), ("truncated.JPEG", undecodable["truncated"]),
            ("png.JPEG", convertible["png"])]
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=["a", "b"])})
    table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": n} for n, b in rows], "label": [0, 1, 0]},
                                       features=features)
    source = HFSource(table)
    with pytest.raises(BadImageError, match=r"row 1 \(truncated.JPEG\): OSError: image file is truncated"):
        reader(source, "fail")[(0, 1)]
    (pixels, _), label, index, bad = reader(source, "skip")[(0, 1)]
    assert pixels.shape == (3, SIZE, SIZE) and (label, index, bad) == (0, 1, 1)


def test_a_long_run_of_bad_images_stops_even_under_skip(roots):
    tried = []

    def broken(index):
        tried.append(index)
        decode_rgb(b"not an image", f"img{index}")

    with pytest.raises(BadImageError, match="100 images in a row from img5 cannot be decoded"):
        BadImages("skip").read(broken, 5, 10**6)
    assert tried == list(range(5, 105))


def test_bomb_is_refused_before_any_pixel_is_decoded(roots, monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's default limit is in force
    with pytest.raises(BadImageError, match="decompression bomb.*4225000000 pixels"):
        decode_rgb(roots.undecodable["bomb"], "bomb.JPEG")
    assert loads == []
    decode_rgb(roots.convertible["cmyk"])
    assert (40, 30) in loads  # the patch does see real decodes


@pytest.mark.parametrize("source", ["imagefolder", "parquet"])
def test_validate_lists_exactly_the_undecodable_files(roots, tmp_path, capsys, source):
    out = tmp_path / "bad.tsv"
    assert validate_main([str(roots.salted), "--source", source, "--out", str(out)]) == 1
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    expected = {PLACES[k][2]: k for k in UNDECODABLE} | {VAL_BAD[2]: "zero"}
    assert len(rows) == len(expected) == 5
    where = {name: reason for path, reason in rows for name in expected if name in path}
    assert set(where) == set(expected)
    reasons = {"zero": "empty file", "truncated": "image file is truncated", "random": "not an image",
               "bomb": "decompression bomb"}
    for name, kind in expected.items():
        assert reasons[kind] in where[name], (name, where[name])
    if source == "imagefolder":  # the path column is the file itself
        assert {Path(p) for p, _ in rows} == {roots.salted / s / f"n0000000{c}" / n for s, c, n in
                                              [*(PLACES[k] for k in UNDECODABLE), VAL_BAD]}
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary == [f"{roots.salted}: 33 images checked (26 train, 7 val), 5 bad, listed in {out}"]


def test_validate_clean_dataset_exits_0_through_the_cli(roots, tmp_path, capsys):
    out = tmp_path / "bad.tsv"
    out.write_text("stale\tlist\n")
    assert data_main(["validate", str(roots.clean), "--out", str(out), "--workers", "2"]) == 0
    assert out.read_text() == ""
    assert capsys.readouterr().out.strip() == f"{roots.clean}: 24 images checked (18 train, 6 val), 0 bad"
    with pytest.raises(SystemExit) as exit_:
        data_main(["validate", str(tmp_path / "nowhere"), "--out", str(out)])
    assert exit_.value.code == 2 and "nowhere does not exist" in capsys.readouterr().err


def test_pipeline_carries_the_bad_flag_to_the_trainer(roots, tmp_path):
    cfg = load_config(None, [f"data.root={roots.salted}", "data.source=parquet", "data.bad_images=skip",
                             f"data.image_size={SIZE}", "data.workers=0", "batch.global_batch_size=26",
                             "batch.per_device_batch_size=13", "model.bn_group_size=13"])
    engine = SimpleNamespace(is_main=True, world_size=1, rank=0, device=torch.device("cpu"), barrier=lambda: None)
    data = build_data(cfg, plan_batches(cfg, 1), engine)
    val_reader = data.val_loader.loader.dataset
    assert isinstance(val_reader, SampleReader) and val_reader.seed is None and val_reader.bad_images.policy == "skip"
    data.train_sampler.set_epoch(0)
    batches = list(data.train_loader)
    assert sum(len(index) for _, _, index, _ in batches) == 26
    assert sum(int(bad.sum()) for _, _, _, bad in batches) == len(UNDECODABLE)
    val = [(labels, bad) for _, labels, bad in data.val_loader]
    assert sum(len(labels) for labels, _ in val) == 7 and sum(int(b.sum()) for _, b in val) == 1
