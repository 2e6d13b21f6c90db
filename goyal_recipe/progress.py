"""Where a run is, what its updates summed, and when it checkpoints: the loop's rules as data.

`Progress` is everything a checkpoint needs to continue the loop where it stopped: the update count
(from which the epoch and the data position follow), the skip counters, and this rank's running
sums (`UpdateSums`) of the current epoch and of the current logging window. `checkpoint_due` is the
one rule for when the loop checkpoints. Torch only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .state_files import CheckpointError


class UpdateSums:
    """This rank's sums over some updates: loss (per-sample losses summed), top-1 correct, images, and
    substituted bad images. Held in one float64 tensor on the device, so that a whole window or epoch is
    summed over ranks by one all-reduce and read on the host once; its layout is known here only."""

    FIELDS = ("loss_sum", "top1_correct", "images", "bad_images")
    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @classmethod
    def zeros(cls, device: torch.device | str | None = None) -> UpdateSums:
        return cls(torch.zeros(len(cls.FIELDS), dtype=torch.float64, device=device))

    def add_micro_batch(self, loss_sum: torch.Tensor, top1_correct: torch.Tensor) -> None:
        """Add a micro-batch's device values without reading them on the host."""
        self.tensor[:2] += torch.stack([loss_sum.double(), top1_correct.double()])

    def set_counts(self, images: int, bad_images: int) -> None:
        # fill_ passes the number to a kernel. An indexed assignment (tensor[2] = n) would copy a host
        # tensor to CUDA: a blocking copy that waits for every queued kernel.
        self.tensor[2].fill_(images)
        self.tensor[3].fill_(bad_images)

    def add(self, other: UpdateSums) -> None:
        self.tensor += other.tensor

    def zero(self) -> None:
        self.tensor.zero_()

    def summed_over_ranks(self, engine) -> UpdateSums:
        return UpdateSums(engine.all_reduce_sum(self.tensor))

    @property
    def loss_sum(self) -> torch.Tensor:
        return self.tensor[0]

    @property
    def top1_correct(self) -> torch.Tensor:
        return self.tensor[1]

    @property
    def images(self) -> torch.Tensor:
        return self.tensor[2]

    @property
    def bad_images(self) -> torch.Tensor:
        return self.tensor[3]

    def mean_loss(self) -> float:
        return float(self.loss_sum / self.images)

    def top1_error_pct(self) -> float:
        return float(100 * (1 - self.top1_correct / self.images))


class UpdateResult(NamedTuple):
    """One update as `TrainStep` returns it."""

    sums: UpdateSums
    """This rank's sums of the update's micro-batches (counted whether or not it was applied)."""
    lr: float
    """The LR the update used (or would have, when skipped)."""
    applied: bool
    """False when the update was dropped (a non-finite loss or gradient on some rank)."""
    indices: list[int]
    """The sample indices this rank used, in order."""


class Progress:
    """Where the run is, and the running sums of its current epoch: both go into every checkpoint, so an
    epoch resumed mid-way reports what the uninterrupted epoch would (train loss, top-1 error, bad images).

    `update` counts loop iterations, applied or skipped: the data position, from which the epoch and the
    sample within it follow (GoyalLR counts the updates really applied, for the LR). `state_dict` is the
    position, the same on every rank (saved once); `sums_state_dict` is this rank's sums (saved per rank)."""

    SHARED = ("update", "skipped_updates", "consecutive_skips")

    def __init__(self, updates_per_epoch: int, global_batch_size: int, device: torch.device | str | None = None):
        self.updates_per_epoch, self.global_batch_size = updates_per_epoch, global_batch_size
        self.update = self.skipped_updates = self.consecutive_skips = 0
        self.epoch_sums = UpdateSums.zeros(device)
        """This rank's sums over the current epoch's applied updates (for the epoch record)."""
        self.window_sums = UpdateSums.zeros(device)
        """This rank's sums over the applied updates since the last step record."""

    @property
    def epoch(self) -> int:
        """The 0-based epoch the next update belongs to."""
        return self.update // self.updates_per_epoch

    @property
    def update_in_epoch(self) -> int:
        """Updates of the current epoch already done."""
        return self.update - self.epoch * self.updates_per_epoch

    @property
    def at_epoch_end(self) -> bool:
        return self.update % self.updates_per_epoch == 0

    def sampler_start(self, world_size: int) -> int:
        """This rank's position in the epoch's permutation: its share of the samples already used. Derived from
        the update count, not from the sampler's state: the loader reads ahead of the updates done."""
        return self.update_in_epoch * self.global_batch_size // world_size

    def finish_update(self, result: UpdateResult) -> None:
        """Count an update: an applied one adds its sums, a skipped one counts towards the run's stop."""
        if result.applied:
            self.window_sums.add(result.sums)
            self.epoch_sums.add(result.sums)
            self.consecutive_skips = 0
        else:
            self.skipped_updates += 1
            self.consecutive_skips += 1
        self.update += 1

    def new_epoch(self) -> None:
        self.epoch_sums.zero()

    def state_dict(self) -> dict:
        return {**{key: getattr(self, key) for key in self.SHARED}, "updates_per_epoch": self.updates_per_epoch,
                "global_batch_size": self.global_batch_size}

    def sums_state_dict(self) -> dict:
        return {"epoch_sums": self.epoch_sums.tensor.cpu().clone(), "window_sums": self.window_sums.tensor.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position, checked against this run's plan."""
        saved = (int(state["global_batch_size"]), int(state["updates_per_epoch"]))
        if saved != (self.global_batch_size, self.updates_per_epoch):
            raise CheckpointError(f"the checkpoint was written with batch.global_batch_size={saved[0]} and {saved[1]} "
                                  f"updates per epoch, this run has {self.global_batch_size} and "
                                  f"{self.updates_per_epoch}; resume with the recipe and data that wrote it, or set "
                                  "run.resume=none")
        for key in self.SHARED:
            setattr(self, key, int(state[key]))

    def add_sums(self, state: dict) -> None:
        """Add a rank's saved running sums to this rank's (onto zeros: restore them)."""
        self.epoch_sums.tensor += state["epoch_sums"].to(self.epoch_sums.tensor.device)
        self.window_sums.tensor += state["window_sums"].to(self.window_sums.tensor.device)


def checkpoint_due(update: int, updates_per_epoch: int, every_updates: int, stop_at: int) -> bool:
    """Whether the loop checkpoints once `update` updates are done: at every epoch's end (after its evaluation),
    every `every_updates` inside an epoch (0: never), and where the run stops (`run.max_updates`) so that a
    resume continues from there. A run stopped by non-finite updates also checkpoints, before it raises."""
    return (update % updates_per_epoch == 0 or (every_updates > 0 and update % every_updates == 0)
            or update == stop_at)
