"""GoyalLR: applies a `Schedule` to a torch optimizer, once per real optimizer update."""

from __future__ import annotations

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .schedule import Schedule


def _innermost_optimizer(optimizer: Optimizer) -> Optimizer:
    """The torch optimizer that really updates weights.

    accelerate's AcceleratedOptimizer and DeepSpeed's ZeRO optimizers (not torch optimizers
    themselves) wrap a torch optimizer in `.optimizer`, and may wrap each other (accelerate's
    DeepSpeedOptimizerWrapper over a ZeRO optimizer over the SGD); the deepest torch optimizer is the one
    whose `step()` runs exactly once per real update, and whose param groups the update reads.
    """
    found, node, seen = optimizer, optimizer, set()
    while (node := getattr(node, "optimizer", None)) is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, Optimizer):
            found = node
    return found


def step_skipped_by_amp(optimizer: Optimizer, kwargs: dict) -> bool:
    """Whether this `optimizer.step()` call is one a gradient scaler has told to skip its update.

    For an optimizer with `_step_supports_amp_scaling` (torch's fused SGD, Adam, Adagrad), GradScaler
    calls `step()` even when the gradients overflowed and the kernel skips the update itself: torch sets
    `optimizer.found_inf` (a tensor) for the duration of the call; a custom optimizer may take it as a
    `found_inf` keyword of `step()` instead. Other optimizers are not called at all on an overflow, so
    neither is present. (A custom `step()` taking GradScaler's deprecated `grad_scaler` keyword reads
    the overflow itself, out of sight of the hooks: such steps still count.)
    """
    found_inf = kwargs.get("found_inf", getattr(optimizer, "found_inf", None))
    if found_inf is None:
        return False
    # A device-to-host read, once per step call: only fp16 loops with such an optimizer pay it.
    return bool(torch.as_tensor(found_inf).ne(0).any())


class GoyalLR(LRScheduler):
    """LR scheduler whose LR at optimizer update t (0-based) is `schedule.lr(t / updates_per_epoch)`.

    Progress is counted in real optimizer updates, by hooks on the optimizer, never in calls
    to `step()`. That keeps the LR right when a wrapper calls `step()` several times per update
    (accelerate steps a prepared scheduler once per process), when an update is skipped
    (AMP overflow: `optimizer.step()` is not run, or a fused optimizer's step runs with GradScaler's
    non-zero `found_inf` and leaves the weights as they were), and under gradient accumulation. A pre-step
    hook sets every group's LR just before the update, so even a loop that never calls
    `scheduler.step()` uses the right LR; `step()` only refreshes `get_last_lr()`.

    A param group's optional `lr_scale` key multiplies its LR (timm's layer-wise LR convention).

    Checkpointing: save `state_dict()`; on resume, load the optimizer's state first, then this.
    """

    def __init__(self, optimizer: Optimizer, schedule: Schedule, updates_per_epoch: int, last_epoch: int = -1):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a goyal_recipe.Schedule, got {type(schedule).__name__}")
        if int(updates_per_epoch) != updates_per_epoch or updates_per_epoch <= 0:
            raise ValueError(f"updates_per_epoch must be a positive integer, got {updates_per_epoch}")
        self.schedule = schedule
        self.updates_per_epoch = int(updates_per_epoch)
        self.updates_done = 0
        inner = _innermost_optimizer(optimizer)
        self._groups = list(inner.param_groups)
        self._stepped: set[int] = set()  # ids of the groups stepped so far in the current update
        inner.register_step_pre_hook(self._before_update)
        inner.register_step_post_hook(self._after_update)
        super().__init__(inner, last_epoch)

    def lr_at(self, update: int) -> float:
        """Schedule LR (before any group's `lr_scale`) used by 0-based update `update`."""
        return self.schedule.lr(update / self.updates_per_epoch)

    def _apply(self) -> None:
        for group, lr in zip(self._groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self._groups]

    def _refresh_groups(self) -> None:
        # Optimizer.load_state_dict replaces the group dicts; ZeRO narrows param_groups only inside step().
        if not self._stepped:
            self._groups = list(self.optimizer.param_groups)

    def _before_update(self, optimizer, args, kwargs) -> None:
        if not self._stepped:
            if len(optimizer.param_groups) == len(self._groups):
                self._groups = list(optimizer.param_groups)
            self._apply()

    def _after_update(self, optimizer, args, kwargs) -> None:
        if step_skipped_by_amp(optimizer, kwargs):
            return  # not an update: the retry runs at the LR the pre-hook just set, as this attempt did
        # DeepSpeed's ZeRO-1/2 step the wrapped optimizer once per param group, narrowing its
        # param_groups to that group: an update is done once every group has stepped.
        self._stepped.update(id(group) for group in optimizer.param_groups)
        if self._stepped.issuperset(id(group) for group in self._groups):
            self._stepped.clear()
            self.updates_done += 1

    def get_lr(self) -> list[float]:
        lr = self.lr_at(self.updates_done)
        return [lr * group.get("lr_scale", 1.0) for group in self._groups]

    def step(self, epoch=None) -> None:
        if epoch is not None:
            raise TypeError(
                "GoyalLR.step() takes no argument: the LR follows real optimizer updates "
                "(DeepSpeed passes a batch size here; let the trainer step it instead)"
            )
        self.last_epoch += 1
        self._refresh_groups()
        self._apply()

    def state_dict(self) -> dict:
        return {
            "updates_done": self.updates_done,
            "updates_per_epoch": self.updates_per_epoch,
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if int(state_dict["updates_per_epoch"]) != self.updates_per_epoch:
            raise ValueError(
                f"checkpoint has {state_dict['updates_per_epoch']} updates per epoch but this run has "
                f"{self.updates_per_epoch}; resume with the same global batch size and dataset"
            )
        self.updates_done = int(state_dict["updates_done"])
        self.last_epoch = int(state_dict["last_epoch"])
        self._refresh_groups()
        self._apply()

