"""One random shuffle of the training set per epoch, divided among the workers (Remark 4)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: (seed, epoch) pairs map to distinct generator seeds


class EpochShuffleSampler(Sampler[int]):
    """Indices of one rank for one epoch, from a permutation that depends only on (seed, epoch).

    The permutation is cut into consecutive blocks of `batch_size` indices (one rank's
    micro-batch) dealt to the ranks in turn: block b goes to rank b % num_replicas. Update u of a
    run with `accumulation_steps` A on k ranks thus uses blocks [u*A*k, (u+1)*A*k) whatever k and A
    are, and a block is the same BN group whether it lands on another worker or in another
    accumulation micro-batch (the equivalence of the paper's footnote 5). With the defaults
    (batch_size=1) the split is the interleaving of torch's DistributedSampler.

    drop_last=True keeps the largest prefix of the permutation that fills whole updates
    (batch_size * num_replicas * accumulation_steps indices); the dropped tail changes every
    epoch. drop_last=False keeps every index once; ranks may then get up to one block more or less.

    Resume inside an epoch with `set_epoch(epoch, start=i)`, where i is how many of this rank's
    indices were already consumed: iteration yields exactly the remainder.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = True, *, batch_size: int = 1, accumulation_steps: int = 1,
                 shuffle: bool = True):
        for key, value in (("num_samples", num_samples), ("num_replicas", num_replicas),
                           ("batch_size", batch_size), ("accumulation_steps", accumulation_steps)):
            if int(value) != value or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.batch_size = int(batch_size)
        self.accumulation_steps = int(accumulation_steps)
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self._last_iterated_epoch: int | None = None
        if drop_last and self.kept_samples == 0:
            raise ValueError(
                f"{num_samples} samples do not fill one update of {self.samples_per_update} "
                "(batch_size x num_replicas x accumulation_steps); use a larger dataset or a smaller global batch"
            )

    @property
    def samples_per_update(self) -> int:
        return self.batch_size * self.num_replicas * self.accumulation_steps

    @property
    def kept_samples(self) -> int:
        """Indices used per epoch by all ranks together."""
        if self.drop_last:
            return self.num_samples // self.samples_per_update * self.samples_per_update
        return self.num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; skip the first `start` indices of this rank (resume)."""
        if start < 0 or start > self._rank_count():
            raise ValueError(f"start must be in [0, {self._rank_count()}], got {start}")
        self.epoch = int(epoch)
        self.start = int(start)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of all `num_samples` indices, identical on every rank."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        generator.manual_seed((self.seed * _SEED_MIX + epoch) % (2**63))
        return torch.randperm(self.num_samples, generator=generator)

    def rank_indices(self, epoch: int) -> torch.Tensor:
        """All of this rank's indices for `epoch`, in order, before any resume offset."""
        kept = self.permutation(epoch)[: self.kept_samples]
        block, ranks = self.batch_size, self.num_replicas
        full = kept.numel() // (block * ranks) * (block * ranks)
        mine = kept[:full].view(-1, ranks, block)[:, self.rank].reshape(-1)
        tail = kept[full:]  # only with drop_last=False: fewer than one block per rank left
        return torch.cat([mine, tail[self.rank * block: (self.rank + 1) * block]])

    def _rank_count(self) -> int:
        block, ranks = self.batch_size, self.num_replicas
        full = self.kept_samples // (block * ranks)
        tail = self.kept_samples - full * block * ranks
        return full * block + min(max(tail - self.rank * block, 0), block)

    def __len__(self) -> int:
        return self._rank_count() - self.start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle and self._last_iterated_epoch == self.epoch and self.start == 0:
            warnings.warn(
                f"EpochShuffleSampler iterated twice for epoch {self.epoch}: the order repeats; "
                "call set_epoch(epoch) before each epoch",
                stacklevel=2,
            )
        self._last_iterated_epoch = self.epoch
        return iter(self.rank_indices(self.epoch)[self.start:].tolist())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']} but this sampler has seed {self.seed}; "
                             "resume with the run's seed")
        self.set_epoch(int(state["epoch"]), int(state["start"]))
