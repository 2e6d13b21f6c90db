"""Data layer: generated dataset, sources, transforms, loader."""

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from goyal_recipe.data import (
    IMAGENET_MEAN,
    EncodedImage,
    ImageFolderSource,
    Lighting,
    build_dataset,
    build_loader,
    eval_resize_size,
    eval_transform,
    generate_dataset,
    generate_main,
    read_done,
    train_transform,
)
from torchvision import transforms as T

SMALL = dict(num_classes=3, train_per_class=6, val_per_class=2, image_size=(40, 30))


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
    """The quickstart defaults: 10 classes x (100 train + 20 val), 64x48, difficulty 0.5."""
    root = tmp_path_factory.mktemp("default")
    generate_dataset(root)
    return root


# ---------------------------------------------------------------- generation


def test_generation_is_deterministic_with_exact_counts(tmp_path):
    a = generate_dataset(tmp_path / "a", seed=3, **SMALL)
    generate_dataset(tmp_path / "b", seed=3, workers=1, **SMALL)  # thread count must not matter
    generate_dataset(tmp_path / "c", seed=4, **SMALL)
    ha, hb, hc = (tree_hashes(tmp_path / n) for n in "abc")
    assert ha == hb
    assert set(ha) == set(hc)
    jpegs = [k for k in ha if k.endswith(".JPEG")]
    assert all(ha[k] != hc[k] for k in jpegs)  # another seed changes every image
    assert ha["parquet/train-00000-of-00001.parquet"] != hc["parquet/train-00000-of-00001.parquet"]
    assert len(set(ha[k] for k in jpegs)) == len(jpegs) == 3 * (6 + 2)  # no two images alike

    root = tmp_path / "a"
    synsets = (root / "synsets.txt").read_text().split()
    assert synsets == ["n00000000", "n00000001", "n00000002"]
    for split, per_class in (("train", 6), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == synsets
        for s in synsets:
            names = sorted(p.name for p in (root / split / s).iterdir())
            assert names == [f"{s}_{i:05d}.JPEG" for i in range(per_class)]
    assert sorted(p.name for p in (root / "parquet").iterdir()) == [
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    assert a["images"] == {"train": 18, "val": 6} and a["generated"] is True
    with Image.open(root / "train" / "n00000001" / "n00000001_00003.JPEG") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 30))


def test_done_marker_makes_generation_idempotent(tmp_path):
    first = generate_dataset(tmp_path, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    again = generate_dataset(tmp_path, **SMALL)
    assert again["generated"] is False and again["images"] == first["images"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert read_done(tmp_path)["params"]["num_classes"] == 3

    # Other parameters regenerate cleanly: no file of the old layout survives.
    generate_dataset(tmp_path, **{**SMALL, "num_classes": 2, "val_per_class": 1}, formats=("jpeg",))
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["n00000000", "n00000001"]
    assert len(list((tmp_path / "val").rglob("*.JPEG"))) == 2
    assert not (tmp_path / "parquet").exists()
    assert json.loads((tmp_path / "DONE").read_text())["params"]["formats"] == ["jpeg"]


def test_generation_refuses_a_root_it_did_not_write(tmp_path):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by"):
        generate_dataset(tmp_path, **SMALL)
    assert (tmp_path / "train" / "n01440764").is_dir()


def test_generate_cli_prints_one_line(tmp_path, capsys):
    argv = ["generate", str(tmp_path), "--classes", "2", "--train-per-class", "3", "--val-per-class", "1"]
    assert generate_main(argv + ["--image-size", "32x24", "--formats", "parquet", "--difficulty", "0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "2 classes, 6 train + 2 val images, 32x24" in lines[0]
    assert not (tmp_path / "train").exists() and (tmp_path / "parquet").is_dir()


# ---------------------------------------------------------------- sources


def test_folder_and_parquet_sources_agree(default_root):
    for split, n in (("train", 1000), ("val", 200)):
        folder = build_dataset("imagefolder", default_root, split)
        parquet = build_dataset("parquet", default_root, split)
        assert len(folder) == len(parquet) == n
        assert folder.classes == parquet.classes == [f"n{i:08d}" for i in range(10)]
        assert folder.num_classes == parquet.num_classes == 10
        assert folder.targets == parquet.targets.tolist()
        assert np.bincount(parquet.targets).tolist() == [n // 10] * 10
        for i, (path, label) in enumerate(folder.samples):
            assert Path(path).read_bytes() == parquet.image_bytes(i)
            assert folder.class_to_idx[Path(path).parent.name] == label
    folder = build_dataset("imagefolder", default_root, "val")
    parquet = build_dataset("parquet", default_root, "val")
    for i in (0, 37, 199):
        (image_f, yf), (image_p, yp) = folder[i], parquet[i]
        assert isinstance(image_f, EncodedImage) and image_f.data == image_p.data and yf == yp == i // 20
        assert image_f.name == folder.samples[i][0]
        assert image_p.name == f"{parquet.files[0]}#{i} ({Path(folder.samples[i][0]).name})"  # shard, row, file
        xf, xp = (T.PILToTensor()(image.rgb()) for image in (image_f, image_p))
        assert xf.shape == (3, 48, 64) and torch.equal(xf, xp)


def test_parquet_shards_and_row_groups_index_like_the_folder(tmp_path):
    generate_dataset(tmp_path, num_classes=2, train_per_class=600, val_per_class=1, image_size=(16, 12))
    assert sorted(p.name for p in (tmp_path / "parquet").glob("train-*")) == [
        "train-00000-of-00002.parquet",  # 1000 rows per shard, 64 per row group
        "train-00001-of-00002.parquet",
    ]
    folder = build_dataset("imagefolder", tmp_path, "train")
    parquet = build_dataset("parquet", tmp_path, "train")
    assert len(parquet) == 1200 and parquet.targets.tolist() == [0] * 600 + [1] * 600
    for i in (0, 63, 64, 599, 600, 999, 1000, 1199, 5, 1100, 640):  # across groups and shards, out of order
        assert Path(folder.samples[i][0]).read_bytes() == parquet.image_bytes(i)
    with pytest.raises(IndexError):
        parquet.image_bytes(1200)


def test_parquet_source_pickles_and_opens_lazily(default_root):
    src = build_dataset("parquet", default_root, "train")
    x0, y0 = src[123]
    clone = pickle.loads(pickle.dumps(src))
    assert len(pickle.dumps(src)) < 50_000  # handles and decoded row groups are not pickled
    x1, y1 = clone[123]
    assert y0 == y1 == 1 and x0 == x1 and len(x0.data) > 0


def test_hf_source_reads_local_parquet_offline(default_root, tmp_path):
    hf = build_dataset("hf", default_root, "val", cache_dir=str(tmp_path / "cache"))
    folder = build_dataset("imagefolder", default_root, "val")
    assert len(hf) == 200 and hf.classes == folder.classes
    assert hf.targets.tolist() == folder.targets
    assert hf[57][0].data == folder[57][0].data and hf[57][1] == 2

    with pytest.raises(FileNotFoundError, match="not in the local HF cache") as err:
        build_dataset("hf", "goyal-recipe-test/no-such-dataset", "train", cache_dir=str(tmp_path / "empty"))
    assert "allow_download=True" in str(err.value)


def test_every_image_mode_loads_as_rgb(default_root, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(default_root / "train" / "n00000000", root / "n00000000")
    rgb = Image.open(root / "n00000000" / "n00000000_00000.JPEG").convert("RGB")
    odd = {
        "cmyk.JPEG": (rgb.convert("CMYK"), "JPEG"),
        "gray.JPEG": (rgb.convert("L"), "JPEG"),
        "png.JPEG": (rgb, "PNG"),  # ImageNet has a PNG with a .JPEG name
        "palette.JPEG": (rgb.convert("P"), "PNG"),
        "alpha.JPEG": (rgb.convert("RGBA"), "PNG"),
    }
    for name, (image, fmt) in odd.items():
        image.save(root / "n00000000" / name, format=fmt)
    src = ImageFolderSource(root)
    by_name = {Path(p).name: i for i, (p, _) in enumerate(src.samples)}
    for name in odd:
        image, y = src[by_name[name]]
        x = T.PILToTensor()(image.rgb())
        assert x.shape == (3, 48, 64) and x.dtype == torch.uint8 and y == 0, name
    gray = T.PILToTensor()(src[by_name["gray.JPEG"]][0].rgb())
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@pytest.mark.parametrize("kind", ["imagefolder", "parquet"])
def test_missing_root_is_a_one_line_error(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(kind, missing, "train")
    message = str(err.value)
    assert "\n" not in message and str(missing) in message
    assert f"goyal-data generate {missing}" in message and "data.root" in message


def test_empty_split_and_bad_arguments(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="has no class folders"):
        build_dataset("imagefolder", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="has no val/ folder"):
        build_dataset("imagefolder", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="has no validation-\\*.parquet shards"):
        build_dataset("parquet", tmp_path, "val")
    with pytest.raises(ValueError, match="unknown data source kind 'lmdb'"):
        build_dataset("lmdb", tmp_path, "train")
    with pytest.raises(ValueError, match="split must be"):
        build_dataset("imagefolder", tmp_path, "test")


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("size,resize", [(224, 256), (64, 73)])
def test_transform_shapes_and_sizes(size, resize):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    train = train_transform(size, color_jitter=0.4, pca_lighting=0.1)
    ev = eval_transform(size)
    assert train(image).shape == (3, size, size)
    assert ev(image).shape == (3, size, size)
    assert eval_resize_size(size) == resize
    assert ev.transforms[0].size == resize and ev.transforms[1].size == (size, size)
    crop = train.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop)
    assert crop.size == (size, size) and crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    assert [type(t).__name__ for t in train.transforms] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Lighting", "Normalize"
    ]
    plain = train_transform(size)
    assert [type(t).__name__ for t in plain.transforms] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"
    ]
    assert plain.transforms[-1].mean == IMAGENET_MEAN


def test_eval_transform_is_deterministic_and_normalised():
    gray = Image.new("RGB", (300, 200), (124, 116, 104))  # ~ the ImageNet mean
    x = eval_transform(64)(gray)
    assert torch.allclose(x, eval_transform(64)(gray))
    assert x.abs().max() < 0.01


def test_lighting():
    img = torch.rand(3, 8, 8)
    assert torch.equal(Lighting(0.0)(img), img)
    torch.manual_seed(0)
    out = Lighting(0.1)(img)
    shift = out - img
    # One RGB offset per image: eigvec @ (alpha * eigval), so every pixel moves alike.
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6)
    torch.manual_seed(0)
    alpha = torch.randn(3) * 0.1
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    assert torch.allclose(shift[:, 0, 0], (eigvec * alpha * eigval).sum(1), atol=1e-6)


# ---------------------------------------------------------------- learnability


def _nearest_mean_accuracy(root) -> float:
    def arrays(split):
        src = build_dataset("parquet", root, split)
        x = np.stack([np.asarray(Image.open(io.BytesIO(src.image_bytes(i)))) for i in range(len(src))])
        n, h, w, c = x.shape
        x = x.reshape(n, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4)).reshape(n, -1) / 255.0  # 16x12 RGB
        return x, src.targets

    xt, yt = arrays("train")
    xv, yv = arrays("val")
    means = np.stack([xt[yt == c].mean(0) for c in range(10)])
    pred = ((xv[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yv).mean())


def test_difficulty_controls_learnability(default_root, tmp_path):
    # Nearest class mean on 16x12 pixels, 10 classes (chance 0.10), seed 0, measured:
    # difficulty 0.0 -> 1.000, 0.5 -> 0.470, 0.9 -> 0.265. (For reference, not asserted: a 7-layer
    # CNN, 15 epochs, reaches 0.915 at 0.5 and a linear probe on raw pixels 0.64.)
    easy = generate_dataset(tmp_path / "easy", difficulty=0.0)
    hard = generate_dataset(tmp_path / "hard", difficulty=0.9)
    acc_easy = _nearest_mean_accuracy(easy["root"])
    acc_mid = _nearest_mean_accuracy(default_root)
    acc_hard = _nearest_mean_accuracy(hard["root"])
    assert acc_easy >= 0.95
    assert 0.3 <= acc_mid <= 0.75
    assert 0.15 <= acc_hard <= 0.45 and acc_hard < acc_mid - 0.1


# ---------------------------------------------------------------- loader


class IndexWithNoise(torch.utils.data.Dataset):
    """Returns its index and a random draw, standing in for a random augmentation."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return i, torch.rand(2), np.random.rand()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_follows_the_sampler(num_workers):
    order = [7, 3, 3, 0, 49, 12, 5, 8, 1]
    loader = build_loader(IndexWithNoise(), order, batch_size=2, num_workers=num_workers)
    assert [i for batch in loader for i in batch[0].tolist()] == order
    assert loader.persistent_workers is (num_workers > 0)
    assert len(loader) == 5
    dropped = build_loader(IndexWithNoise(), order, batch_size=2, num_workers=num_workers, drop_last=True)
    assert [i for batch in dropped for i in batch[0].tolist()] == order[:8]


def test_loader_augmentations_are_reproducible():
    def run(seed, epochs=2):
        loader = build_loader(IndexWithNoise(), list(range(20)), batch_size=4, num_workers=2, worker_seed=seed)
        return [torch.cat([b[1].flatten(), b[2].float()]) for _ in range(epochs) for b in loader]

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[5])  # the second epoch draws new augmentations


class Augmented(torch.utils.data.Dataset):
    """A source's images decoded and augmented by torchvision transforms drawing from the worker's RNG."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        image, label = self.source[i]
        return self.transform(image.rgb()), label


def test_loader_with_real_source_and_workers(default_root):
    src = Augmented(build_dataset("parquet", default_root, "train"), train_transform(32))
    order = list(range(0, 1000, 37))

    def run():
        loader = build_loader(src, order, batch_size=9, num_workers=2, worker_seed=1, persistent_workers=False)
        return [(x, y) for x, y in loader]

    first, second = run(), run()
    assert [y.tolist() for _, y in first] == [[i // 100 for i in order[k : k + 9]] for k in range(0, len(order), 9)]
    assert [x.shape[0] for x, _ in first] == [9, 9, 9, 1]
    assert all(x1.shape[1:] == (3, 32, 32) and torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, second))
