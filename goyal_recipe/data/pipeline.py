"""The trainer's input pipeline: sources, recipe transforms, sampler and loaders wired together.

Augmentation randomness is a function of (seed, epoch, sample index) only: each sample is
transformed under its own seed. A resumed run, a different number of loader workers or a
different world size therefore crop and flip every image exactly as an uninterrupted run would.

Workers hand on uint8 images; the loaders' stage in the main process finishes each batch (float,
PCA lighting, normalisation) on the training device (data/device_decode.py), so the trainer takes
normalised float batches already there.

An image that cannot be decoded follows `data.bad_images` (see `load_sample`): every sample carries
a ``bad`` flag (0/1), so the trainer counts substitutes per update without shared state between
loader workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from ..config import BatchPlan, RecipeConfig
from ..sampler import EpochShuffleSampler
from .decode import EvalDecode, TrainDecode
from .device_decode import StagedLoader, build_device_loader, build_placed_loader
from .generate import generate_dataset
from .sources import build_dataset, load_sample

log = logging.getLogger(__name__)

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)


class EpochSeededDataset(Dataset):
    """Indexed by (epoch, index); returns (image, label, index, bad) with augmentation seeded per sample.

    `index` is the sampler's; with bad_images="skip" a substitute's image and label come with bad=1.
    """

    def __init__(self, dataset, seed: int, bad_images: str = "fail"):
        self.dataset = dataset
        self.seed = seed
        self.bad_images = bad_images

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        saved = torch.get_rng_state()
        # The CPU generator only: torch.manual_seed also queues a CUDA reseed, which on CUDA builds
        # costs more than decoding a small image; the transforms draw from the CPU generator.
        torch.default_generator.manual_seed((self.seed * _MIX[0] + epoch * _MIX[1] + index) % (2**63))
        try:
            image, label, bad = load_sample(self.dataset, index, self.bad_images)
        finally:
            torch.set_rng_state(saved)
        return image, label, index, bad


class FlaggedDataset(Dataset):
    """Returns (image, label, bad) under the bad-image policy; for evaluation, which drops bad=1 samples."""

    def __init__(self, dataset, bad_images: str = "fail"):
        self.dataset = dataset
        self.bad_images = bad_images

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return load_sample(self.dataset, index, self.bad_images)


class EpochTaggedSampler(Sampler):
    """Yields (epoch, index) from an `EpochShuffleSampler`, for `EpochSeededDataset`."""

    def __init__(self, sampler: EpochShuffleSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)


@dataclass
class Data:
    train_loader: StagedLoader
    train_sampler: EpochShuffleSampler
    val_loader: StagedLoader | None
    num_classes: int
    num_train: int
    num_val: int


def generate_configured(cfg: RecipeConfig) -> None:
    """Write the recipe's generated dataset to data.root unless it is there with these settings."""
    gen = cfg.data.generate
    if gen is not None:
        generate_dataset(cfg.data.root, num_classes=gen.num_classes, train_per_class=gen.train_per_class,
                         val_per_class=gen.val_per_class, image_size=(gen.image_width, gen.image_height),
                         seed=gen.seed, difficulty=gen.difficulty)


def ensure_generated(cfg: RecipeConfig, engine) -> None:
    """`generate_configured` on the main process while the other ranks wait."""
    if cfg.data.generate is None:
        return
    if engine.is_main:
        generate_configured(cfg)
    engine.barrier()


def decode_device(cfg: RecipeConfig, engine) -> torch.device | None:
    """Where data.decode=gpu decodes (the engine's CUDA device, else the CPU with a warning); None for cpu."""
    if cfg.data.decode == "cpu":
        return None
    if engine.device.type == "cuda":
        return engine.device
    if engine.is_main:
        log.warning("data.decode=gpu without a CUDA device: JPEGs are decoded on the CPU in the main process, "
                    "slower than data.decode=cpu's loader workers")
    return torch.device("cpu")


def _loader(rows: Dataset, sampler, batch_size: int, cfg: RecipeConfig, engine, device: torch.device | None,
            drop_last: bool = False):
    """The loader of data.decode: decoding in the workers, finished on the engine's device (`device` None), or
    decoding in a stage on `device` after them."""
    if device is not None:
        return build_device_loader(rows, sampler, batch_size, cfg.data.workers, device, drop_last=drop_last,
                                   worker_seed=cfg.run.seed)
    return build_placed_loader(rows, sampler, batch_size, cfg.data.workers, engine.device, drop_last=drop_last,
                               worker_seed=cfg.run.seed)


def build_data(cfg: RecipeConfig, plan: BatchPlan, engine) -> Data:
    d = cfg.data
    ensure_generated(cfg, engine)
    # source=hf reads a name from the local HF cache (data.hf_name) or a dataset directory (data.root).
    root, kw = (d.hf_name or d.root, {"allow_download": d.allow_download}) if d.source == "hf" else (d.root, {})
    train_set = build_dataset(d.source, root, "train",
                              TrainDecode(d.image_size, scale=(d.crop_min_area, 1.0), color_jitter=d.color_jitter,
                                          pca_lighting=d.pca_lighting, draft=d.decode_draft), **kw)
    sampler = EpochShuffleSampler(len(train_set), engine.world_size, engine.rank, seed=cfg.run.seed,
                                  batch_size=plan.per_device_batch_size, accumulation_steps=plan.accumulation_steps)
    device = decode_device(cfg, engine)
    train_loader = _loader(EpochSeededDataset(train_set, cfg.run.seed, d.bad_images), EpochTaggedSampler(sampler),
                           plan.per_device_batch_size, cfg, engine, device, drop_last=True)
    val_loader, num_val = None, 0
    if cfg.run.eval_every_epochs:
        val_set = build_dataset(d.source, root, "val", EvalDecode(d.image_size, draft=d.decode_draft), **kw)
        num_val = len(val_set)
        # Every validation image exactly once across ranks: no padding, no drop.
        val_sampler = EpochShuffleSampler(num_val, engine.world_size, engine.rank, drop_last=False, shuffle=False,
                                          batch_size=d.eval_batch_size or plan.per_device_batch_size)
        val_loader = _loader(FlaggedDataset(val_set, d.bad_images), val_sampler, val_sampler.batch_size, cfg, engine,
                             device)
    return Data(train_loader, sampler, val_loader, train_set.num_classes, len(train_set), num_val)
