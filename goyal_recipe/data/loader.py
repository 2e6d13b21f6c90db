"""DataLoader construction: order from the sampler only, reproducible worker randomness."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset


def build_loader(
    dataset: Dataset,
    sampler: Iterable[int],
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    drop_last: bool = False,
    worker_seed: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` in exactly the order of `sampler` (it never shuffles).

    Worker w seeds torch, `random` and numpy from a base seed drawn from a generator seeded with
    `worker_seed`, i.e. from (worker_seed, w): the same sampler and worker_seed give the same
    augmented batches (give each rank its own worker_seed). Persistent workers (default when
    num_workers > 0) carry their RNG state on across epochs; with num_workers=0 augmentations use
    the main process's torch RNG.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    kw = {}
    if num_workers > 0:
        kw["persistent_workers"] = True if persistent_workers is None else persistent_workers
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    elif persistent_workers:
        raise ValueError("persistent_workers=True needs num_workers > 0")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(worker_seed),
        collate_fn=collate_fn,
        **kw,
    )
