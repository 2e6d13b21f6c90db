"""What a training loop holds under its frameworks' wrappers: the user's module under DDP or
torch.compile, the `GoyalLR` under accelerate's scheduler wrapper, and the sampler of a DataLoader with
how a framework's loader sharding splits it (duck-typed: accelerate's `BatchSamplerShard` and
friends are recognised by their attributes, so this module imports no framework). The audit reads
loops through these; core module: torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .lr import GoyalLR

__all__ = ["LoaderParts", "loader_parts", "unwrap_model", "unwrap_scheduler"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_scheduler(scheduler):
    """The scheduler under wrappers that keep it in `.scheduler` (accelerate's AcceleratedScheduler)."""
    while scheduler is not None and not isinstance(scheduler, GoyalLR) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return scheduler


@dataclass
class LoaderParts:
    sampler: object | None  # the index sampler under any batch sampler
    shards: int  # how many ways the loader itself splits the batches (accelerate's BatchSamplerShard)
    micro_batch: int | None  # samples per micro-batch on one rank
    batch_size: int | None = None  # the batches the sampler's samples are cut into, before a loader shards them
    drop_last: bool | None = None  # whether that batching drops a short last batch (None: not known)


def loader_parts(loader) -> LoaderParts:
    """The sampler of a DataLoader, and how a framework's wrapping of it splits the data (duck-typed)."""
    shards, split_batches, batch_size = 1, False, getattr(loader, "batch_size", None)
    if hasattr(loader, "slice_fn") and hasattr(getattr(loader, "state", None), "num_processes"):
        # accelerate's DataLoaderDispatcher (dispatch_batches=True): the main process reads the batches and deals
        # them out, so the split is the loader's own, not a node of its batch sampler.
        shards, split_batches = int(loader.state.num_processes), bool(getattr(loader, "split_batches", False))
    node = getattr(loader, "batch_sampler", None)
    sampler = getattr(loader, "sampler", None)
    drop_last = None
    while node is not None:
        if hasattr(node, "num_processes") and hasattr(node, "process_index"):
            shards *= int(node.num_processes)
            split_batches = split_batches or bool(getattr(node, "split_batches", False))
        if getattr(node, "batch_size", None):
            batch_size = node.batch_size
        inner = getattr(node, "batch_sampler", None)
        if inner is None:
            sampler = getattr(node, "sampler", sampler)
            drop_last = getattr(node, "drop_last", None)
            break
        node = inner
    micro = None if batch_size is None else (batch_size // shards if split_batches else batch_size)
    return LoaderParts(sampler, shards, micro, batch_size, drop_last)


def _sampler_replicas(sampler) -> int:
    return int(getattr(sampler, "num_replicas", 1) or 1)
