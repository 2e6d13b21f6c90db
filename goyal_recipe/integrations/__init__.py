"""The recipe inside a user's own loop: one module per framework, each the only one importing it.

- `integrations.accelerate`: `AccelerateRecipe`, for `Accelerator` loops (`accumulate()`, `prepare()`,
  `save_state()`/`load_state()`).
- `integrations.ddp`: `DDPRecipe`, for plain `DistributedDataParallel` under torchrun.
- `integrations.deepspeed`, `integrations.transformers`: DeepSpeed engines and `Trainer`.

`LoopRecipe` (this module, torch only) is what they share. It owns the three things whose agreement
the paper's update needs and that a loop otherwise keeps apart:

- the data: one `EpochShuffleSampler` (Remark 4), either split over the ranks by itself or one stream
  that a framework's loader sharding splits once;
- the LR: a `GoyalLR` over the user's optimizer, counting real updates;
- the position: the LR's update count, plus the updates whose data went through `loss()` but that a
  loss scaler skipped (fp16's GradScaler on an overflow), counted from the micro-batches. The data
  position is derived from them (epoch = updates // updates_per_epoch, and the sampler starts that
  epoch after the updates already done), so `state_dict()` / `load_state_dict()` restore both at once
  and a resumed loop continues with the samples and LR of an uninterrupted one.

`loss()` normalises per-sample losses so that the update's gradient is the mean over kn (Remark 3)
given what the engine itself divides by, and reports it to the `FirstUpdateCheck` that `watch()`
installs: the audit runs at the first real update and refuses a silent departure.

With `noise_scale_every_updates`, `watch()` also attaches a `LoopNoiseScale` (`self.noise_scale`): the
gradient noise scale B_simple of McCandlish et al. 2018 from the micro-batch gradients before the
all-reduce and the update's after it, no extra pass; `fields()` gives what to log, and `state_dict()`
carries its averages.
"""

from __future__ import annotations

import math

import torch

from ..audit import Finding, audit
from ..loop_parts import loader_parts, unwrap_model
from ..errors import UserError
from ..first_update import FirstUpdateCheck, record_loss
from ..lr import GoyalLR
from ..noise_scale import LoopNoiseScale
from ..sampler import EpochShuffleSampler
from ..schedule import Schedule


class RecipeSampler(EpochShuffleSampler):
    """`EpochShuffleSampler` whose `set_epoch(epoch)` resumes mid-epoch where a restored recipe left off.

    Frameworks call `set_epoch(epoch)` themselves (accelerate's prepared loader at every iteration,
    with no offset); after `LoopRecipe.load_state_dict` the resumed epoch starts at the restored
    sample whoever calls it. Later epochs start at 0.
    """

    _resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int, start: int | None = None) -> None:
        if start is None:
            start = self._resume[1] if self._resume is not None and self._resume[0] == int(epoch) else 0
        super().set_epoch(epoch, start)

    def __iter__(self):
        if self._resume is not None and self._resume[0] == self.epoch:
            self._resume = None  # the resumed epoch is under way: a later pass over it starts at 0
        return super().__iter__()


class LoopRecipe:
    """The recipe's data order, LR and position for a user's loop; see the module docstring.

    `schedule.global_batch_size` is kn = world_size x per_device_batch_size x accumulation_steps; the
    accumulation steps are derived and must be a whole number. `split_in_sampler`: True when the
    sampler splits the data over the ranks (plain DDP), False when it is one stream that the
    framework's loader sharding splits (accelerate's `prepare`). Either way rank r's micro-batches are
    the same blocks of the epoch's permutation as `goyal-train`'s. `bn_group_size`: the BN batch the
    audit expects (None: not checked). `allow`: audit codes accepted on purpose.
    `noise_scale_every_updates`: measure the gradient noise scale on every N-th update (None: off).
    """

    fix_loss = "use recipe.loss(per_sample_loss)"
    fix_loader = ""
    grad_scaler = None  # the loop's torch.amp.GradScaler, where watch() was given one

    def __init__(self, schedule: Schedule, *, num_samples: int, per_device_batch_size: int, world_size: int,
                 rank: int, split_in_sampler: bool, seed: int = 0, bn_group_size: int | None = 32,
                 allow: tuple[str, ...] = (), noise_scale_every_updates: int | None = None):
        if not isinstance(schedule, Schedule):
            raise UserError(f"schedule must be a goyal_recipe.Schedule, got {type(schedule).__name__}")
        kn, n = schedule.global_batch_size, int(per_device_batch_size)
        per_pass = n * world_size
        if n < 1 or kn % per_pass:
            raise UserError(f"kn = {kn} is not a whole number of micro-batches of {n} on {world_size} processes; "
                            f"choose per_device_batch_size and kn so that kn / ({n} x {world_size}) is a whole number")
        self.schedule = schedule
        self.global_batch_size = kn
        self.per_device_batch_size = n
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.accumulation_steps = kn // per_pass
        self.updates_per_epoch = int(num_samples) // kn
        if self.updates_per_epoch < 1:
            raise UserError(f"{num_samples} samples do not fill one update of kn = {kn}; use more data or a smaller kn")
        self.bn_group_size = bn_group_size
        self.allow = tuple(allow)
        replicas, rank_in_sampler = (world_size, rank) if split_in_sampler else (1, 0)
        self.sampler = RecipeSampler(int(num_samples), replicas, rank_in_sampler, seed, batch_size=n,
                                     accumulation_steps=kn // (n * replicas))
        self.scheduler: GoyalLR | None = None
        self.check: FirstUpdateCheck | None = None
        self.noise_scale_every_updates = noise_scale_every_updates
        self.noise_scale: LoopNoiseScale | None = None
        self._noise_state: dict | None = None
        self._micro_batches = 0  # this process's losses from loss() that were back-propagated: the data's own count
        self._resumed_skips = 0  # skipped_updates when the state was loaded

    # --- the LR and the position
    def make_scheduler(self, optimizer) -> GoyalLR:
        """The `GoyalLR` of this recipe over `optimizer` (plain or wrapped)."""
        self.scheduler = GoyalLR(optimizer, self.schedule, self.updates_per_epoch)
        return self.scheduler

    @property
    def updates_done(self) -> int:
        return 0 if self.scheduler is None else self.scheduler.updates_done

    @property
    def skipped_updates(self) -> int:
        """Updates whose micro-batches were back-propagated through `loss()` but that the optimizer never applied
        (steps a loss scaler skipped): the data is that many updates ahead of the LR."""
        return max(0, self._micro_batches // self.accumulation_steps - self.updates_done)

    @property
    def epoch(self) -> int:
        """The epoch of the data the next update takes."""
        return (self.updates_done + self.skipped_updates) // self.updates_per_epoch

    @property
    def total_updates(self) -> int:
        return round(self.schedule.epochs * self.updates_per_epoch)

    def position(self) -> tuple[int, int]:
        """(epoch, index into this sampler's share of the epoch) of the next update's first sample."""
        done = self.updates_done + self.skipped_updates
        return done // self.updates_per_epoch, (done % self.updates_per_epoch) * (
            self.global_batch_size // self.sampler.num_replicas)

    def epochs(self, loader=None):
        """The epochs still to train, from the restored position; sets the data's epoch before each.

        With `loader` (accelerate's prepared loader has its own epoch counter) the loader's
        `set_epoch` is called, else the sampler's.
        """
        for epoch in range(self.epoch, math.ceil(self.schedule.epochs)):
            (loader if hasattr(loader, "set_epoch") else self.sampler).set_epoch(epoch)
            yield epoch

    def state_dict(self) -> dict:
        return {"global_batch_size": self.global_batch_size, "updates_per_epoch": self.updates_per_epoch,
                "seed": self.sampler.seed,
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "micro_batches": self._micro_batches,
                "noise_scale": None if self.noise_scale is None else self.noise_scale.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the LR position and put the data at the same place (load the optimizer's state first)."""
        for key, mine in (("global_batch_size", self.global_batch_size),
                          ("updates_per_epoch", self.updates_per_epoch), ("seed", self.sampler.seed)):
            if int(state[key]) != mine:
                raise UserError(f"the checkpoint has {key} = {state[key]} but this run has {mine}; resume with the "
                                "run's kn, data set and seed")
        if self.scheduler is None:
            raise UserError("make the scheduler (recipe.make_scheduler or prepare) before loading the recipe's state")
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._micro_batches = int(state.get("micro_batches", self.updates_done * self.accumulation_steps))
        self._resumed_skips = self.skipped_updates
        noise = state.get("noise_scale")
        if self.noise_scale is not None and noise is not None:
            self.noise_scale.load_state_dict(noise)
        else:
            self._noise_state = noise  # for the meter `watch` attaches, if not yet there
        epoch, start = self.position()
        self.sampler._resume = (epoch, start)
        self.sampler.set_epoch(epoch)

    # --- the loss
    @property
    def loss_divisor(self) -> int:
        """What the loop's backward divides the loss by (plain torch: nothing)."""
        return 1

    def loss(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss to back-propagate: the update's gradient is then the mean over its kn samples.

        Pass per-sample losses (`reduction="none"`). Each is weighted 1/kn, times the ranks the
        gradient all-reduce averages over, times what the engine divides the loss by (Remark 3).
        """
        scale = self.world_size * self.loss_divisor / self.global_batch_size
        loss = per_sample_loss.sum() * scale
        if loss.requires_grad:
            # Counted in the backward: a loss computed and not back-propagated (an evaluation without no_grad)
            # used no training data.
            loss.register_hook(self._count_micro_batch)
        record_loss(per_sample_loss.numel(), scale, loss)
        return loss

    def _count_micro_batch(self, grad: torch.Tensor) -> None:
        self._micro_batches += 1

    # --- the check at the first update
    def findings(self, model=None, optimizer=None, loader=None, scheduler=None,
                 checkpointed=None, grad_clip_norm: float | None = None) -> list[Finding]:
        """The static audit of this loop (what `watch` evaluates at the first update)."""
        return audit(model=model, optimizer=optimizer, scheduler=scheduler if scheduler is not None else self.scheduler,
                     loader=loader, sampler=None if loader is not None else self.sampler,
                     global_batch_size=self.global_batch_size, world_size=self.world_size,
                     accumulation_steps=self.accumulation_steps,
                     per_device_batch_size=None if loader is not None else self.per_device_batch_size,
                     bn_group_size=self.bn_group_size, grad_clip_norm=grad_clip_norm, checkpointed=checkpointed,
                     fix_loader=self.fix_loader)

    def watch(self, model, optimizer, loader=None, scheduler=None, *, checkpointed=None,
              grad_clip_norm: float | None = None, on_remove=None, grad_scaler=None) -> FirstUpdateCheck:
        """Audit the loop at its first real update and refuse a silent departure (`RecipeMismatch`).

        `grad_scaler`: the loop's `torch.amp.GradScaler` (fp16), whose scale the losses carry in the backward.
        """
        if grad_scaler is not None:
            self.grad_scaler = grad_scaler
        if scheduler is None and self.scheduler is None:
            self.make_scheduler(optimizer)
        if self.check is not None:
            self.check.remove()
        sampler = self.sampler
        if loader is not None:
            sampler = loader_parts(loader).sampler
        self.check = FirstUpdateCheck(
            optimizer, global_batch_size=self.global_batch_size, world_size=self.world_size,
            accumulation_steps=self.accumulation_steps,
            static=lambda: self.findings(model, optimizer, loader, scheduler, checkpointed, grad_clip_norm),
            scheduler=scheduler if scheduler is not None else self.scheduler, sampler=sampler, allow=self.allow,
            fix_loss=self.fix_loss, on_remove=on_remove, loss_scale=self._loss_scale,
            skipped_updates=lambda: self._resumed_skips)
        if self.noise_scale_every_updates is not None:
            # A resumed state is loaded once; a second watch carries the running meter's averages over.
            carried, self._noise_state = self._noise_state, None
            if self.noise_scale is not None:
                carried = self.noise_scale.state_dict()
                self.noise_scale.remove()
            self.noise_scale = LoopNoiseScale(
                unwrap_model(model).parameters(), micro_batch_size=self.per_device_batch_size,
                global_batch_size=self.global_batch_size, world_size=self.world_size,
                every_updates=self.noise_scale_every_updates, grad_scaler=self._grad_scaler()).attach(optimizer)
            if carried is not None:
                self.noise_scale.load_state_dict(carried)
        return self.check

    def _grad_scaler(self):
        """The loop's gradient scaler (fp16), whose scale the micro-batch gradients carry; None without one."""
        return self.grad_scaler

    def _loss_scale(self) -> float | None:
        """What the loop's loss scaler multiplies the losses by: 1.0 without one given to `watch`."""
        scaler = self._grad_scaler()
        return 1.0 if scaler is None else scaler.get_scale()
