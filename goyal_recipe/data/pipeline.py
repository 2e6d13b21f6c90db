"""The trainer's input pipeline: sources, the reader, the sampler and the staged loaders wired together.

The pieces, in the order a sample meets them: the source yields its bytes, name and label
(data/sources.py); the reader (data/reader.py) seeds the sample's draws from (seed, epoch, index),
plans the crop from the header and decodes now or defers the JPEG to the device, under the
bad-image policy (data/bad_images.py); the loader's stage (data/device_decode.py) finishes each
batch (float, PCA lighting, normalisation) on the training device, so the trainer takes normalised
float batches already there.

Every sample carries a ``bad`` flag (0/1) under `data.bad_images`, so the trainer counts substitutes
per update without shared state between loader workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from ..config import BatchPlan, RecipeConfig
from ..sampler import EpochShuffleSampler
from .bad_images import BadImages
from .decode import EvalDecode, TrainDecode
from .device_decode import StagedLoader, build_staged_loader
from .generate import generate_dataset
from .reader import SampleReader
from .sources import build_dataset

log = logging.getLogger(__name__)


class EpochTaggedSampler(Sampler):
    """Yields (epoch, index) from an `EpochShuffleSampler`: the training keys of `SampleReader`."""

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


def stage_device(cfg: RecipeConfig, engine) -> torch.device:
    """Where the loaders' stage puts batches: the engine's device, except that data.decode=gpu without a
    CUDA device decodes on the CPU (with a warning)."""
    if cfg.data.decode == "cpu" or engine.device.type == "cuda":
        return engine.device
    if engine.is_main:
        log.warning("data.decode=gpu without a CUDA device: JPEGs are decoded on the CPU in the main process, "
                    "slower than data.decode=cpu's loader workers")
    return torch.device("cpu")


def build_data(cfg: RecipeConfig, plan: BatchPlan, engine) -> Data:
    d = cfg.data
    ensure_generated(cfg, engine)
    # source=hf reads a name from the local HF cache (data.hf_name) or a dataset directory (data.root).
    root, kw = (d.hf_name or d.root, {"allow_download": d.allow_download}) if d.source == "hf" else (d.root, {})
    device, defer_jpegs = stage_device(cfg, engine), d.decode == "gpu"
    bad_images = BadImages(d.bad_images)
    train_transform = TrainDecode(d.image_size, scale=(d.crop_min_area, 1.0), color_jitter=d.color_jitter,
                                  pca_lighting=d.pca_lighting, draft=d.decode_draft)
    train = SampleReader(build_dataset(d.source, root, "train", **kw), train_transform, bad_images, cfg.run.seed,
                         defer_jpegs)
    sampler = EpochShuffleSampler(len(train), engine.world_size, engine.rank, seed=cfg.run.seed,
                                  batch_size=plan.per_device_batch_size, accumulation_steps=plan.accumulation_steps)
    train_loader = build_staged_loader(train, EpochTaggedSampler(sampler), plan.per_device_batch_size, d.workers,
                                       device, drop_last=True, worker_seed=cfg.run.seed)
    val_loader, num_val = None, 0
    if cfg.run.eval_every_epochs:
        val = SampleReader(build_dataset(d.source, root, "val", **kw), EvalDecode(d.image_size, draft=d.decode_draft),
                           bad_images, defer_jpegs=defer_jpegs)
        num_val = len(val)
        # Every validation image exactly once across ranks: no padding, no drop.
        val_sampler = EpochShuffleSampler(num_val, engine.world_size, engine.rank, drop_last=False, shuffle=False,
                                          batch_size=d.eval_batch_size or plan.per_device_batch_size)
        # Not pinned: the trainer opens the next epoch's training batches before it evaluates, and page-locked
        # validation batches would then come on top of the training ones, up to workers x 2 batches each (torch
        # rounds each page-locked block up to a power of two). Unpinned, each validation batch's copy blocks the
        # host while it runs: a few milliseconds for 256 images at 224 px, against a forward pass over them.
        val_loader = build_staged_loader(val, val_sampler, val_sampler.batch_size, d.workers, device,
                                         worker_seed=cfg.run.seed, pin_memory=False)
    return Data(train_loader, sampler, val_loader, train.source.num_classes, len(train), num_val)
