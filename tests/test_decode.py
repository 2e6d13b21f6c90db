"""Decoding from bytes: the crop plan drawn from the header, the draft rule, and the device decode stage.

Differences are mean absolute differences of pixels in 0..255 units (normalised outputs are mapped
back with the ImageNet std). Measured on generated 500x375 q90 JPEGs at 64 px output, drafted vs
full decode: 1.11 mean, 2.27 worst crop here (61 drafted crops of 16 images), 1.19 and 2.63 on the
benchmark's 64 images (at 224 px nothing is drafted on these: a crop is at most 375 high). For
scale: PIL's bicubic vs its bilinear filter on the same crops differ by 0.66, Lanczos 1.05, box
1.77, and a crop drawn from another seed by 37 (median). torch's antialiased resize vs PIL's (no
draft, `TrainDecode` vs `train_transform`): 0.03 mean, 0.25 worst.

The uint8 transport (workers hand on uint8 pixels and lighting draws, the batch is finished on the
device) changes no number on the CPU: its batches equal the float path's exactly. On CUDA the
division by 255 goes through its reciprocal: within CUDA_FINISH_ATOL.
"""

import io
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from goyal_recipe.config import load_config, plan_batches
from goyal_recipe.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    BadImages,
    Deferred,
    EncodedImage,
    EvalDecode,
    Placed,
    Plan,
    Lighting,
    SampleReader,
    TrainDecode,
    build_dataset,
    decode_rgb,
    device_decode,
    draft_reduction,
    eval_transform,
    generate_dataset,
    sample_seed,
    train_transform,
)
from goyal_recipe.data.device_decode import StagedLoader
from goyal_recipe.data.pipeline import build_data

DRAFT_MEAN_BOUND = 2.0  # measured 1.19
DRAFT_WORST_BOUND = 4.0  # measured 2.63
RESAMPLER_WORST_BOUND = 0.5  # torch vs PIL antialiased bilinear; measured 0.25
# x * (1/255) in place of x / 255: an ulp of a value in [0, 1] (6e-8), times 1/std (4.5), plus rounding.
CUDA_FINISH_ATOL = 1e-6
STD_255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference in 0..255 of two normalised images (or of two uint8 images)."""
    if a.dtype == torch.uint8:
        return (a.float() - b.float()).abs().mean().item()
    return ((a - b) * STD_255.to(a.device)).abs().mean().item()


@pytest.fixture(scope="module")
def imagenet_sized(tmp_path_factory):
    """Generated ImageNet-sized JPEGs: 500x375, quality 90 (the benchmark's images)."""
    root = tmp_path_factory.mktemp("imagenet_sized")
    generate_dataset(root, num_classes=2, train_per_class=8, val_per_class=2, image_size=(500, 375),
                     formats=("jpeg",), jpeg_quality=90)
    return sorted((root / "train").rglob("*.JPEG"))


def encoded(path: Path) -> EncodedImage:
    return EncodedImage(path.read_bytes(), str(path))


def seeded(seed: int, fn, *args):
    torch.manual_seed(seed)
    return fn(*args)


# ---------------------------------------------------------------- the plan


def test_plan_draws_what_train_transform_draws():
    tf = TrainDecode(64, color_jitter=0.4, pca_lighting=0.1)
    jitter = T.ColorJitter(0.4, 0.4, 0.4)
    for seed in range(20):
        plan = seeded(seed, tf.plan, 500, 375)
        after_plan = torch.rand(1)
        torch.manual_seed(seed)
        box = T.RandomResizedCrop.get_params(Image.new("RGB", (500, 375)), [0.08, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        order, *factors = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        alpha = torch.randn(3) * 0.1
        assert plan.box == box and plan.flip == flip and plan.image_hw == (375, 500) and plan.resize_hw == (64, 64)
        assert plan.jitter == (tuple(order.tolist()), *factors)
        assert plan.lighting_alpha == pytest.approx(alpha.tolist())
        assert torch.equal(after_plan, torch.rand(1))  # the same number of draws, so later ones agree too


def render(transform, image, plan):
    """The normalised output of `plan`: the worker's half, then the batch's half on this one image."""
    pixels, alpha = transform.place_planned(image, image.open(), plan)
    return transform.finish(pixels.unsqueeze(0), alpha.unsqueeze(0))[0]


def test_drafted_and_full_decodes_use_the_same_crop(imagenet_sized):
    drafted, full = TrainDecode(64, draft=True), TrainDecode(64, draft=False)
    for seed, path in enumerate(imagenet_sized):
        plan = seeded(seed, drafted.plan, 500, 375)
        assert plan == seeded(seed, full.plan, 500, 375)  # boxes and flips equal
        # __call__ is that plan rendered: the header size is the stored size.
        image = encoded(path)
        assert torch.equal(seeded(seed, drafted, image), render(drafted, image, plan))


def test_full_decode_matches_the_torchvision_transforms(imagenet_sized):
    for size in (224, 64):
        ours, reference = TrainDecode(size, draft=False), train_transform(size)
        for seed, path in enumerate(imagenet_sized):
            a = seeded(seed, ours, encoded(path))
            b = seeded(seed, reference, decode_rgb(path.read_bytes()))
            assert a.shape == b.shape == (3, size, size) and a.is_contiguous()
            assert mad(a, b) < RESAMPLER_WORST_BOUND, (size, path.name)
    ours, reference = EvalDecode(224, draft=False), eval_transform(224)
    for path in imagenet_sized:
        assert mad(ours(encoded(path)), reference(decode_rgb(path.read_bytes()))) < RESAMPLER_WORST_BOUND


# ---------------------------------------------------------------- the draft rule


@pytest.mark.parametrize("box_hw,target_hw,reduction", [
    ((448, 448), (224, 224), 2),
    ((447, 448), (224, 224), 1),  # one dimension short of 2x: full size
    ((375, 500), (224, 224), 1),  # ImageNet-sized image at 224: never drafted
    ((900, 2000), (224, 224), 4),
    ((1792, 1792), (224, 224), 8),
    ((4000, 4000), (224, 224), 8),  # 8 is libjpeg's largest reduction
    ((100, 100), (224, 224), 1),  # a crop smaller than the output is upsampled: never drafted
    ((375, 500), (73, 97), 4),  # evaluation at 64 px: shorter side 375 / 4 >= 73 > 375 / 8
])
def test_draft_rule(box_hw, target_hw, reduction):
    assert draft_reduction(box_hw, target_hw) == reduction


def test_drafted_pixels_differ_by_resampling_noise_only(imagenet_sized):
    drafted, full = TrainDecode(64, draft=True), TrainDecode(64, draft=False)
    diffs, reductions, other_crop = [], [], []
    for seed, path in enumerate(imagenet_sized):
        for repeat in range(4):
            plan = seeded(100 * repeat + seed, drafted.plan, 500, 375)
            image = encoded(path)
            header = image.open()
            a, reduction = drafted.decode_placed(image, header, plan)
            if reduction > 1:  # PIL decoded at the reduced size
                assert header.size == (math.ceil(500 / reduction), math.ceil(375 / reduction))
            b, full_size = full.decode_placed(encoded(path), encoded(path).open(), plan)
            assert full_size == 1 and a.shape == b.shape == (3, 64, 64)
            diffs.append(mad(a, b))
            reductions.append(reduction)
            other = seeded(100 * repeat + seed + 1, full.plan, 500, 375)
            other_crop.append(mad(a, full.decode_placed(encoded(path), encoded(path).open(), other)[0]))
    assert {2, 4} <= set(reductions) and reductions.count(1) < len(reductions) / 4  # 64 px: most crops drafted
    drafted_diffs = [d for d, r in zip(diffs, reductions) if r > 1]
    assert np.mean(drafted_diffs) < DRAFT_MEAN_BOUND and max(drafted_diffs) < DRAFT_WORST_BOUND
    assert all(d == 0 for d, r in zip(diffs, reductions) if r == 1)  # no draft: the same decoder and resize
    assert np.median(other_crop) > 5 * DRAFT_WORST_BOUND  # the bound is far below a wrong crop


def test_no_draft_when_the_output_is_bigger_than_the_crop(imagenet_sized):
    tf = TrainDecode(64, draft=True)
    image = encoded(imagenet_sized[0])
    header = image.open()
    small_box = Plan((375, 500), (10, 20, 40, 50), (64, 64))  # upsampled to 64 px
    pixels, reduction = tf.decode_placed(image, header, small_box)
    assert reduction == 1 and header.size == (500, 375) and pixels.shape == (3, 64, 64)
    # At 224 px an ImageNet-sized crop is never drafted, for training or evaluation.
    for seed in range(50):
        plan = seeded(seed, TrainDecode(224).plan, 500, 375)
        assert draft_reduction(plan.box[2:], plan.resize_hw) == 1
    assert EvalDecode(224).plan(500, 375).resize_hw == (256, 341)  # 375 < 2 x 256


def test_eval_drafts_while_the_shorter_side_stays_above_the_resize(imagenet_sized):
    drafted, full, reference = EvalDecode(64, draft=True), EvalDecode(64, draft=False), eval_transform(64)
    for path in imagenet_sized:
        plan = drafted.plan(500, 375)
        assert plan.resize_hw == (73, 97) and plan.crop == (4, 16, 64, 64)  # torchvision's Resize + CenterCrop
        image = encoded(path)
        header = image.open()
        a, reduction = drafted.decode_placed(image, header, plan)
        assert reduction == 4 and header.size == (125, 94)
        b, _ = full.decode_placed(encoded(path), encoded(path).open(), plan)
        assert mad(a, b) < DRAFT_WORST_BOUND
        assert mad(drafted(encoded(path)), reference(decode_rgb(path.read_bytes()))) < DRAFT_WORST_BOUND


def test_large_jpeg_drafts_at_one_eighth():
    pixels = np.random.default_rng(0).integers(0, 256, (1600, 2000, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((250, 200)).resize((2000, 1600), Image.BILINEAR)  # smooth
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    data = EncodedImage(buf.getvalue())
    plan = EvalDecode(64).plan(2000, 1600)
    header = data.open()
    a, reduction = EvalDecode(64).decode_placed(data, header, plan)
    assert reduction == 8 and header.size == (250, 200)
    b, _ = EvalDecode(64, draft=False).decode_placed(EncodedImage(buf.getvalue()), EncodedImage(buf.getvalue()).open(),
                                                     plan)
    assert mad(a, b) < DRAFT_MEAN_BOUND


# ---------------------------------------------------------------- other files and bad files


def _odd_files(jpeg: bytes) -> dict[str, bytes]:
    rgb = Image.open(io.BytesIO(jpeg)).convert("RGB")

    def encode(image, fmt="JPEG"):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return buf.getvalue()

    return {"cmyk": encode(rgb.convert("CMYK")), "gray": encode(rgb.convert("L")), "png": encode(rgb, "PNG"),
            "palette": encode(rgb.convert("P"), "PNG"), "truncated": jpeg[: len(jpeg) // 2], "zero": b""}


@pytest.mark.parametrize("draft", [True, False])
def test_every_mode_decodes_as_the_torchvision_transforms_do(imagenet_sized, draft):
    files = _odd_files(imagenet_sized[0].read_bytes())
    ours, reference = TrainDecode(64, draft=draft), train_transform(64)
    for name in ("cmyk", "gray", "png", "palette"):
        a = seeded(7, ours, EncodedImage(files[name], name))
        b = seeded(7, reference, decode_rgb(files[name]))
        assert a.shape == (3, 64, 64) and mad(a, b) < (DRAFT_WORST_BOUND if draft else RESAMPLER_WORST_BOUND), name
    for name, reason in (("truncated", "image file is truncated"), ("zero", "empty file")):
        with pytest.raises(BadImageError, match=reason) as err:
            ours(EncodedImage(files[name], f"{name}.JPEG"))
        assert err.value.path == f"{name}.JPEG"


# ---------------------------------------------------------------- decode=gpu, run on the CPU device


@pytest.fixture(scope="module")
def salted(tmp_path_factory):
    """A small generated folder dataset with a CMYK JPEG, a PNG named .JPEG, a grayscale and a truncated JPEG."""
    root = tmp_path_factory.mktemp("salted")
    generate_dataset(root, num_classes=3, train_per_class=6, val_per_class=2, image_size=(48, 40), formats=("jpeg",))
    files = _odd_files((root / "train/n00000000/n00000000_00000.JPEG").read_bytes())
    for name, where in (("cmyk", "train/n00000001"), ("png", "train/n00000000"), ("gray", "train/n00000002"),
                        ("truncated", "train/n00000001"), ("png", "val/n00000001")):
        (root / where / f"{Path(where).name}_00000a_{name}.JPEG").write_bytes(files[name])
    return root


def _engine(device="cpu"):
    return SimpleNamespace(is_main=True, world_size=1, rank=0, device=torch.device(device), barrier=lambda: None)


def _data(root, *overrides, device="cpu", batch=11):
    cfg = load_config(None, [f"data.root={root}", "data.image_size=16", f"batch.global_batch_size={batch}",
                             f"batch.per_device_batch_size={batch}", f"model.bn_group_size={batch}", *overrides])
    return build_data(cfg, plan_batches(cfg, 1), _engine(device))


def _epoch(data, epoch=1):
    data.train_sampler.set_epoch(epoch)
    return list(data.train_loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decode_on_cpu_gives_the_cpu_paths_batches(salted, workers):
    overrides = [f"data.workers={workers}", "data.bad_images=skip", "data.decode_draft=false"]
    cpu = _epoch(_data(salted, *overrides))
    gpu_data = _data(salted, *overrides, "data.decode=gpu")
    assert isinstance(gpu_data.train_loader, StagedLoader) and len(gpu_data.train_loader) == 2
    gpu = _epoch(gpu_data)
    assert len(cpu) == len(gpu) == 2  # 22 training images
    for (xc, yc, ic, bc), (xg, yg, ig, bg) in zip(cpu, gpu):
        assert torch.equal(yc, yg) and torch.equal(ic, ig) and torch.equal(bc, bg)
        assert xg.shape == (11, 3, 16, 16) and xg.dtype == torch.float32
        # Same libjpeg IDCT, same uint8 resize and arithmetic on the CPU device: identical, not just close.
        assert torch.equal(xc, xg)
    assert sum(int(b.sum()) for *_, b in gpu) == 1  # the truncated JPEG was substituted (bad_images=skip)
    val_cpu = list(_data(salted, *overrides).val_loader)
    val_gpu = list(gpu_data.val_loader)
    for (xc, yc, bc), (xg, yg, bg) in zip(val_cpu, val_gpu, strict=True):
        assert torch.equal(xc, xg) and torch.equal(yc, yg) and torch.equal(bc, bg)


def test_gpu_decode_within_resampling_noise_of_the_drafted_cpu_path(imagenet_sized, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(imagenet_sized[0].parents[2], root)  # 16 train images of 500x375
    overrides = ["data.workers=0", "data.image_size=64", "run.eval_every_epochs=0"]
    cpu = _epoch(_data(root, *overrides, batch=8))
    gpu = _epoch(_data(root, *overrides, "data.decode=gpu", batch=8))
    diffs = [mad(a, b) for (xc, *_), (xg, *_) in zip(cpu, gpu) for a, b in zip(xc, xg)]
    assert len(diffs) == 16 and np.mean(diffs) < DRAFT_MEAN_BOUND and max(diffs) < DRAFT_WORST_BOUND


def test_files_the_device_cannot_decode_take_the_cpu_path(salted):
    transform = TrainDecode(16)
    source = build_dataset("imagefolder", salted, "train")
    reader = SampleReader(source, transform, BadImages("fail"), seed=3, defer_jpegs=True)
    index_of = {Path(path).name: i for i, (path, _) in enumerate(source.samples)}
    paths = {name: next((salted / "train").rglob(f"*_{name}.JPEG")) for name in ("cmyk", "png", "gray", "truncated")}
    paths["plain"] = salted / "train/n00000000/n00000000_00001.JPEG"
    for name, path in paths.items():
        key = (2, index_of[path.name])
        if name == "truncated":  # no end marker: PIL decodes it in the worker and finds it cut short
            with pytest.raises(BadImageError, match="truncated"):
                reader[key]
            continue
        rng = torch.get_rng_state()
        out, label, index, bad = reader[key]
        assert torch.equal(torch.get_rng_state(), rng)  # this process's stream is left as it was
        assert (label, index, bad) == (source.targets[key[1]], key[1], 0)
        assert isinstance(out, Deferred) is (name in ("gray", "plain")), name
        # The sample's draws come from its own seed, whatever was drawn before.
        plan = seeded(sample_seed(3, *key), transform.plan, *Image.open(path).size)
        pixels, alpha = seeded(sample_seed(3, *key), transform.placed, EncodedImage(path.read_bytes(), str(path)))
        if isinstance(out, Deferred):  # bytes, the plan and the key go on to the device stage
            assert out.data == path.read_bytes() and out.plan == plan and out.key == key
        else:  # decoded in the worker by the cpu path, under the plan drawn before the choice
            assert torch.equal(out.pixels, pixels) and torch.equal(out.lighting_alpha, alpha)
        now, *_ = reader.read(key, defer=False)  # what the device stage falls back on
        assert isinstance(now, Placed) and torch.equal(now.pixels, pixels) and torch.equal(now.lighting_alpha, alpha)


def test_a_jpeg_the_device_rejects_is_redone_on_the_cpu(salted, monkeypatch):
    overrides = ["data.workers=0", "data.decode_draft=false", "data.bad_images=skip"]
    cpu = _epoch(_data(salted, *overrides))
    rejected = []
    real_decode = device_decode.DecodeStage.decode

    def reject_the_second(self, jpegs):
        out = real_decode(self, jpegs)
        rejected.append(len(out) > 1)
        return [None if k == 1 else x for k, x in enumerate(out)]

    monkeypatch.setattr(device_decode.DecodeStage, "decode", reject_the_second)
    gpu = _epoch(_data(salted, *overrides, "data.decode=gpu"))
    assert all(rejected)
    for (xc, yc, ic, bc), (xg, yg, ig, bg) in zip(cpu, gpu, strict=True):
        assert torch.equal(xc, xg) and torch.equal(yc, yg) and torch.equal(ic, ig) and torch.equal(bc, bg)


def test_gpu_decode_without_cuda_warns_once_and_runs_on_the_cpu(salted, caplog):
    with caplog.at_level("WARNING"):
        data = _data(salted, "data.workers=0", "data.decode=gpu", "data.bad_images=skip")
    warnings = [r.getMessage() for r in caplog.records if "data.decode=gpu" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "data.decode=cpu" in warnings[0]
    images, *_ = next(iter(data.train_loader))
    assert images.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_on_cuda(salted, imagenet_sized, tmp_path):
    # nvjpeg's IDCT and chroma upsampling, and a float resize rounded to uint8, in place of libjpeg-turbo's
    # and torch's uint8 kernel: held to the drafting bounds (not measured on a GPU when written).
    overrides = ["data.workers=2", "data.bad_images=skip", "data.decode_draft=false"]
    cpu = _epoch(_data(salted, *overrides))
    gpu_data = _data(salted, *overrides, "data.decode=gpu", device="cuda")
    gpu = _epoch(gpu_data)
    diffs = []
    for (xc, yc, ic, bc), (xg, yg, ig, bg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda" and xg.shape == xc.shape
        assert torch.equal(yc, yg) and torch.equal(ic, ig) and torch.equal(bc, bg)
        diffs += [mad(a, b) for a, b in zip(xc, xg.cpu())]
    val = [mad(a, b) for (xc, *_), (xg, *_) in zip(_data(salted, *overrides).val_loader, gpu_data.val_loader)
           for a, b in zip(xc, xg.cpu())]
    root = tmp_path / "data"
    shutil.copytree(imagenet_sized[0].parents[2], root)
    overrides = ["data.workers=0", "data.image_size=224", "run.eval_every_epochs=0", "data.decode_draft=false"]
    cpu = _epoch(_data(root, *overrides, batch=8))
    gpu = _epoch(_data(root, *overrides, "data.decode=gpu", device="cuda", batch=8))
    diffs += [mad(a, b) for (xc, *_), (xg, *_) in zip(cpu, gpu) for a, b in zip(xc, xg.cpu())]
    assert len(diffs) == 22 + 16 and len(val) == 7
    assert np.mean(diffs + val) < DRAFT_MEAN_BOUND and max(diffs + val) < DRAFT_WORST_BOUND


# ---------------------------------------------------------------- uint8 transport: workers hand on uint8, the stage finishes


@pytest.mark.parametrize("lighting", [0.0, 0.1])
def test_finish_is_totensor_lighting_normalize(lighting):
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (5, 3, 12, 10), dtype=torch.uint8, generator=gen)
    alphas = torch.randn(5, 3, generator=gen) * lighting
    out = TrainDecode(12, pca_lighting=lighting).finish(pixels, alphas)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 12, 10)
    for x, alpha, y in zip(pixels, alphas, out):
        expected = TF.to_tensor(x.permute(1, 2, 0).numpy())  # ToTensor of the HWC uint8 image
        if lighting:
            expected = expected + Lighting(lighting).rgb_shift(alpha)
        assert torch.equal(y, T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(expected))  # batched: the same floats


def _float_path(data, root, seed: int):
    """The float path as workers ran it before the uint8 transport: each sample decoded to a normalised
    float image on its own (placed, then finished alone), seeded per sample; (train rows by (epoch, index),
    val rows)."""
    bad_images = BadImages("skip")
    train = SampleReader(build_dataset("imagefolder", root, "train"), data.train_loader.stage.transform, bad_images,
                         seed)
    val = SampleReader(build_dataset("imagefolder", root, "val"), data.val_loader.stage.transform, bad_images)

    def float_row(reader, key):
        (pixels, alpha), *rest = reader.read(key, defer=False)
        return (reader.transform.finish(pixels[None], alpha[None])[0], *rest)

    return (lambda key: float_row(train, key)), [float_row(val, i) for i in range(len(val))]


@pytest.mark.parametrize("augment", [[], ["data.color_jitter=0.4", "data.pca_lighting=0.1"]],
                         ids=["crop+flip", "jitter+lighting"])
@pytest.mark.parametrize("decode", [["data.decode=cpu"], ["data.decode=gpu", "data.decode_draft=false"]],
                         ids=["cpu", "gpu"])
def test_uint8_batches_equal_the_float_path(salted, decode, augment):
    data = _data(salted, "data.workers=2", "data.bad_images=skip", "run.seed=5", *decode, *augment)
    train_rows, val_rows = _float_path(data, salted, seed=5)
    batches = _epoch(data, epoch=1)
    assert len(batches) == 2
    for images, labels, index, bad in batches:
        rows = [train_rows((1, int(i))) for i in index]
        assert images.dtype == torch.float32 and images.device.type == "cpu" and images.shape == (11, 3, 16, 16)
        assert torch.equal(images, torch.stack([row[0] for row in rows]))  # exact: same pixels and arithmetic
        assert labels.tolist() == [row[1] for row in rows] and bad.tolist() == [row[3] for row in rows]
    val = list(data.val_loader)
    assert torch.equal(torch.cat([x for x, *_ in val]), torch.stack([row[0] for row in val_rows]))
    assert torch.cat([b for *_, b in val]).tolist() == [row[2] for row in val_rows]


@pytest.mark.filterwarnings("ignore:EpochShuffleSampler iterated twice")  # epoch 0 read twice, on purpose
def test_the_stage_applies_the_lighting_the_workers_drew(salted):
    data = _data(salted, "data.workers=2", "data.bad_images=skip", "data.pca_lighting=0.1")
    data.train_sampler.set_epoch(0)
    loader, stage = data.train_loader.loader, data.train_loader.stage
    assert stage.in_workers  # a CPU device: the workers finish each batch as they collate it
    # the rows as the workers place them, collated without finishing (rows are seeded per sample)
    batch = next(iter(torch.utils.data.DataLoader(loader.dataset, batch_size=11, sampler=loader.sampler)))
    placed, *columns = batch
    assert placed.pixels.dtype == torch.uint8 and placed.pixels.shape == (11, 3, 16, 16)
    assert placed.lighting_alpha.dtype == torch.float32 and placed.lighting_alpha.shape == (11, 3)
    assert bool((placed.lighting_alpha != 0).all())
    rng = torch.get_rng_state()
    images, *rest = stage.finish(batch)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing is drawn in the stage
    assert all(torch.equal(a, b) for a, b in zip(rest, columns))
    finished, *_ = next(iter(data.train_loader))
    assert torch.equal(finished, images)  # what the workers hand on
    transform = stage.transform
    assert not torch.equal(images, transform.finish(placed.pixels, torch.zeros(11, 3)))  # the draws do count
    one_by_one = [transform.finish(x[None], alpha[None])[0] for x, alpha in zip(*placed)]
    assert torch.equal(images, torch.stack(one_by_one))


def test_uint8_batches_are_pinned_for_cuda(salted):
    """The training batches only: the trainer opens the next epoch's before it evaluates, and page-locked
    validation batches would then add to them. A CPU device pins neither."""
    cpu = _data(salted, "data.workers=2", "data.bad_images=skip")
    assert isinstance(cpu.train_loader, StagedLoader)
    assert not cpu.train_loader.loader.pin_memory and not cpu.val_loader.loader.pin_memory
    # Built, not iterated: nothing touches CUDA yet.
    for decode in ("cpu", "gpu"):
        cuda = _data(salted, "data.workers=2", "data.bad_images=skip", f"data.decode={decode}", device="cuda")
        for loader, pinned in ((cuda.train_loader, True), (cuda.val_loader, False)):
            assert loader.loader.pin_memory is pinned and loader.stage.device == torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uint8_transport_on_cuda(salted):
    # Not run on a GPU when written.
    overrides = ["data.workers=2", "data.bad_images=skip", "data.color_jitter=0.4", "data.pca_lighting=0.1"]
    cpu, cuda = _data(salted, *overrides), _data(salted, *overrides, device="cuda")
    for (xc, yc, ic, bc), (xg, yg, ig, bg) in zip(_epoch(cpu), _epoch(cuda), strict=True):
        assert xg.device.type == "cuda" and xg.dtype == torch.float32 and xg.shape == xc.shape
        assert torch.equal(yc, yg) and torch.equal(ic, ig) and torch.equal(bc, bg)
        assert (xg.cpu() - xc).abs().max().item() <= CUDA_FINISH_ATOL
    for (xc, *_), (xg, *_) in zip(cpu.val_loader, cuda.val_loader, strict=True):
        assert (xg.cpu() - xc).abs().max().item() <= CUDA_FINISH_ATOL


# ---------------------------------------------------------------- pinned batches


# What the pipeline gave at commit 82654d4, before the data path was restructured: seed 5, epoch 1.
PINNED_ROWS = {  # per dataset; train batches: (sampler indices, labels, bad flags); val: (labels, bad flags)
    "salted": {
        "train": [
            ([13, 14, 1, 4, 20, 16, 15, 3, 7, 17, 5],
             [1, 1, 0, 0, 2, 2, 2, 0, 1, 2, 0],
             [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ([8, 12, 18, 11, 21, 0, 6, 9, 2, 10, 19],
             [1, 1, 2, 1, 2, 0, 0, 1, 0, 1, 2],
             [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
        ],
        "val": [([0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0])],
    },
    "small_parquet": {
        "train": [
            ([15, 3, 6, 16, 10, 4, 0, 2, 8, 14, 12],
             [2, 0, 1, 2, 1, 0, 0, 0, 1, 2, 2],
             [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ],
        "val": [([0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0])],
    },
}
PINNED_SUMS = {  # per batch, each image's sum
    "cpu_jitter_lighting": {
        "train": [
            [760.1774, 489.1691, 810.7912, 1006.8526, 891.2471, -384.4897, 20.427, 1366.1984, 821.1472, 578.864, 282.306],
            [209.5057, 644.6722, 44.5937, 911.2334, 592.4988, 148.1805, 994.7381, 244.6713, -291.0261, 818.3783, 716.2895],
        ],
        "val": [[447.1713, 852.5018, 565.9354, 496.4645, 906.4605, -23.8058, 285.6646]],
    },
    "gpu_on_cpu": {
        "train": [
            [890.707, 197.3391, 518.9131, 780.9196, 509.3697, 361.8414, 154.4195, 760.7426, 291.2611, 780.8959, 260.9468],
            [476.7483, 230.0284, -24.0399, 320.1462, 449.547, 481.5916, 633.6641, 961.0289, 266.8603, 616.2176, 757.0365],
        ],
        "val": [[445.9131, 850.2529, 563.873, 496.4645, 902.9677, -25.0517, 284.8375]],
    },
    "parquet_drafted": {
        "train": [
            [679.5935, 787.249, 178.5588, 494.1378, 869.6311, 283.1713, 548.82, 823.9159, 286.158, 343.9354, 49.6227],
        ],
        "val": [[452.4739, 860.049, 579.8428, 892.0874, -41.9342, 275.8326]],
    },
}
PINNED_CONFIGS = {  # dataset, overrides
    "cpu_jitter_lighting": ("salted", ["data.color_jitter=0.4", "data.pca_lighting=0.1"]),
    "gpu_on_cpu": ("salted", ["data.decode=gpu", "data.decode_draft=false"]),
    "parquet_drafted": ("small_parquet", ["data.source=parquet"]),  # 120x90 JPEGs at 16 px: most crops drafted
}


@pytest.fixture(scope="module")
def small_parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_parquet")
    generate_dataset(root, num_classes=3, train_per_class=6, val_per_class=2, image_size=(120, 90))
    return root


@pytest.mark.parametrize("name", list(PINNED_CONFIGS))
def test_batches_equal_the_pinned_ones(salted, small_parquet, name):
    """The same samples, labels, substitutes and pixels as the pipeline gave before."""
    dataset, overrides = PINNED_CONFIGS[name]
    root = {"salted": salted, "small_parquet": small_parquet}[dataset]
    data = _data(root, "data.workers=0", "data.bad_images=skip", "run.seed=5", *overrides)
    train = [(i.tolist(), y.tolist(), b.tolist(), x.double().sum((1, 2, 3)).tolist())
             for x, y, i, b in _epoch(data, epoch=1)]
    val = [(y.tolist(), b.tolist(), x.double().sum((1, 2, 3)).tolist()) for x, y, b in data.val_loader]
    assert [row[:3] for row in train] == PINNED_ROWS[dataset]["train"]
    assert [row[:2] for row in val] == PINNED_ROWS[dataset]["val"]
    # One pixel moved by one level changes a sum by 1 / 255 / 0.229 = 0.017; the pins are rounded to 1e-4.
    sums = [row[3] for row in train] + [row[2] for row in val]
    for ours, pinned in zip(sums, PINNED_SUMS[name]["train"] + PINNED_SUMS[name]["val"], strict=True):
        assert ours == pytest.approx(pinned, abs=2e-3)
