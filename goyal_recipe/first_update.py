"""The runtime half of the audit: `FirstUpdateCheck`, the check at a loop's first real update.

Framework-free, so that every integration reuses it. It installs a pre-hook on the innermost torch
optimizer (the one whose `step()` runs once per real update, under accelerate's and DeepSpeed's
wrappers alike) and, at the first real update:

- evaluates the static audit (`goyal_recipe.audit`) then, when the loop is fully assembled (after
  `prepare`, after `load_state`);
- checks what only the running loop shows: the samples that really went into the update, summed
  over micro-batches and all-reduced over ranks, against kn; the weight each sample's loss got in
  the final gradient (the loss helper's factor, divided by the engine's own division of the loss
  and by the ranks' mean) against 1/kn (Remark 3); the LR the optimizer is about to use against
  the schedule; the data position (sampler epoch and offset) against the LR's position;
  a clipping call the integration saw;
- logs the reported findings on rank 0 and raises `RecipeMismatch` on a silent one (every rank
  reaches the same verdict: the runtime numbers are all-reduced first).

Loss helpers report each micro-batch to the active checks with `record_loss(num_samples, scale, loss)`
(`global_batch_loss` does, so its use under an engine that divides again is caught). The gradient that
reaches the reported loss in the backward shows what scaled it after the helper: the engine's own
division, a loss scaler's factor, and anything the loop did to it (a `/ accumulation_steps` of its own,
say), so the weight each sample really got is measured, not assumed. The hooks stay
until the first update of the next epoch, where the sampler must have moved to that epoch (a
sampler that does not reshuffle per epoch), and are then removed: no cost afterwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .audit import Finding, allowed, refuse_silent
from .loop_parts import _sampler_replicas, unwrap_scheduler
from .lr import GoyalLR, _innermost_optimizer, step_skipped_by_amp
from .schedule import Schedule

log = logging.getLogger(__name__)

_WEIGHT_TOLERANCE = 1e-6  # relative; a wrong normalisation is off by a whole factor (A, k, n)
_ACTIVE: list["FirstUpdateCheck"] = []


def record_loss(num_samples: int, scale: float, loss: torch.Tensor | None = None) -> None:
    """Called by loss helpers per micro-batch: `num_samples` per-sample losses, each multiplied by `scale`, summed
    into `loss` (the tensor the helper returns for the backward)."""
    for check in _ACTIVE:
        check.record_loss(num_samples, scale, loss)


@dataclass
class _LossRecord:
    """One micro-batch's loss as a helper reported it."""

    num_samples: int
    scale: float
    divisor: int | None = None  # what the engine's backward divides it by, as the integration says
    grad: torch.Tensor | None = None  # d(what was back-propagated) / d(this loss), taken in the backward

    def arrived(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach()


class FirstUpdateCheck:
    """Audits a loop at its first real optimizer update and refuses silent findings (see the module docstring).

    `static`: returns the static findings (typically a closure over `audit(...)`), evaluated at the
    first update. `loss_divisor`: what the backward divides the loss by. An integration that sees
    its engine's backward calls (accelerate's `accelerator.backward` divides by the accumulation
    steps, DeepSpeed's `engine.backward` too unless scale_wrt_gas=False) says it per call with
    `record_backward`; a loss reported before that call waits for it, and one whose backward nobody
    reported (a plain `loss.backward()`) gets `loss_divisor`, 1 by default.
    `grad_reduction`: "mean" when the gradient all-reduce averages over `world_size` ranks.
    `schedule`/`scheduler`: the LR expected at each update; `sampler`: whose epoch and offset must
    match the LR's position; `data_skipped`: samples of the sampler's epoch that the loader skips
    past the sampler's own offset (Trainer resumes mid-epoch by skipping batches). `fix_loss`: the
    integration's advice for a wrong loss normalisation. `accumulation_steps`: micro-batches per
    update (a loss the check did not see is refused when a per-micro-batch mean would be wrong).
    `on_remove`: called once the hooks are gone (to undo an integration's own instrumentation).
    `loss_scale`: returns the factor a loss scaler multiplied this update's losses by (fp16's GradScaler's
    scale; default: no scaler, 1.0), or None where the integration cannot read it (DeepSpeed's fp16): then
    a loss that reached the backward scaled otherwise than the engine's division is only reported.
    `skipped_updates`: returns how many updates' data the loop had used without an update when it was
    (re)started (steps a loss scaler skipped): the sampler's position is that far ahead of the LR's.
    """

    def __init__(self, optimizer, *, global_batch_size: int | None = None, world_size: int = 1, loss_divisor: int = 1,
                 grad_reduction: str = "mean", static: Callable[[], list[Finding]] | None = None,
                 scheduler=None, schedule: Schedule | None = None, sampler=None, allow: Iterable[str] = (),
                 fix_loss: str = "normalise each micro-batch's per-sample losses with global_batch_loss",
                 accumulation_steps: int = 1, on_remove: Callable[[], None] | None = None, data_skipped: int = 0,
                 loss_scale: Callable[[], float | None] | None = None,
                 skipped_updates: Callable[[], int] | None = None):
        self.optimizer = _innermost_optimizer(optimizer)
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        self.world_size = int(world_size)
        self.loss_divisor = int(loss_divisor)
        self.grad_reduction = grad_reduction
        self.static = static or (lambda: [])
        self.scheduler = unwrap_scheduler(scheduler)
        self.schedule = schedule if schedule is not None else getattr(self.scheduler, "schedule", None)
        self.sampler = sampler
        self.data_skipped = int(data_skipped)
        self.allow = tuple(allow)
        self.fix_loss = fix_loss
        self.accumulation_steps = int(accumulation_steps)
        self.on_remove = on_remove
        self.loss_scale = loss_scale or (lambda: 1.0)
        self.skipped_updates = skipped_updates or (lambda: 0)
        self.findings: list[Finding] | None = None  # what the first update found
        self._pending: list[_LossRecord] = []  # reported losses whose backward has not said its divisor
        self._settled: list[_LossRecord] = []
        self._clip: float | None = None
        self._resumed_at_skip: tuple[int | None, int] = (None, 0)  # the sampler's (epoch, start) when a skip came
        self._first_update: int | None = None
        self._first_epoch: int | None = None
        self._handles = [self.optimizer.register_step_pre_hook(self._before_update)]
        _ACTIVE.append(self)
        self._watch_zero_grad()

    # what the loop reports while it runs
    def record_loss(self, num_samples: int, scale: float, loss: torch.Tensor | None = None) -> None:
        """A loss helper's micro-batch: `num_samples` per-sample losses, each multiplied by `scale`, summed
        into `loss`, whose gradient in the backward is recorded."""
        if self.global_batch_size is None:
            return
        record = _LossRecord(int(num_samples), float(scale))
        if loss is not None and loss.requires_grad:
            loss.register_hook(record.arrived)
        self._pending.append(record)

    def record_backward(self, loss_divisor: int) -> None:
        """The engine's backward of the losses reported so far divides them by `loss_divisor`."""
        self.loss_divisor = int(loss_divisor)
        self._settle()

    def _settle(self) -> None:
        for record in self._pending:
            record.divisor = self.loss_divisor
        self._settled += self._pending
        self._pending = []

    def _discard(self) -> None:
        """The gradients of the losses reported so far are gone (zeroed, or a loss scaler's skipped step): no
        update carries them, so they are not the first update's."""
        self._pending, self._settled = [], []

    def _watch_zero_grad(self) -> None:
        optimizer, zero_grad = self.optimizer, self.optimizer.zero_grad

        def watched(*args, **kwargs):
            self._discard()
            return zero_grad(*args, **kwargs)

        optimizer.zero_grad = watched
        self._unwatch_zero_grad = lambda: optimizer.__dict__.pop("zero_grad", None)

    def record_skipped(self, samples: int) -> None:
        """The loop's loader skips `samples` more of the sampler's epoch (accelerate's `skip_first_batches`)."""
        self.data_skipped += int(samples)
        self._resumed_at_skip = (getattr(self.sampler, "epoch", None), getattr(self.sampler, "start", 0))

    def record_clipping(self, max_norm: float) -> None:
        self._clip = float(max_norm)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._detach()

    def _detach(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
            self._unwatch_zero_grad()
        if self.on_remove is not None:
            self.on_remove()
            self.on_remove = None

    def _remove_after_step(self) -> None:
        """`remove` from inside the pre-hook: deleting a pre-hook while the optimizer iterates over them
        breaks that iteration when another hook follows (a noise-scale meter), so the handles go after the
        step, from a post-hook that is the last one registered and removes itself."""
        handles, self._handles = self._handles, []
        self._detach()
        cell = []

        def drop(*_):
            for handle in (*handles, *cell):
                handle.remove()

        cell.append(self.optimizer.register_step_post_hook(drop))

    def _update_index(self) -> int | None:
        return self.scheduler.updates_done if isinstance(self.scheduler, GoyalLR) else None

    def _before_update(self, optimizer, args, kwargs) -> None:
        if not self._handles:
            return  # done; the handle goes after this step
        if step_skipped_by_amp(optimizer, kwargs):  # GradScaler found inf and the fused kernel skips: no update
            self._discard()
            return
        try:
            done = self._check_first() if self.findings is None else self._check_next_epoch()
        except BaseException:
            self.remove()  # the exception ends the optimizer's iteration over its hooks
            raise
        if done:
            self._remove_after_step()

    def _check_first(self) -> bool:
        """The first update's check; True when nothing is left to check."""
        findings = list(self.static()) + self._runtime_findings()
        self._settled = []
        self.findings = allowed(findings, self.allow)
        self._report(self.findings)
        refuse_silent(self.findings)
        update = self._update_index()
        self._first_update = update
        self._first_epoch = getattr(self.sampler, "epoch", None)
        if update is None or self._first_epoch is None:
            return True
        _ACTIVE.remove(self)  # the loss is checked once; the hook waits for the next epoch
        self._unwatch_zero_grad()
        return False

    def _check_next_epoch(self) -> bool:
        """At the next epoch's first update the sampler must have moved on; True once that update is reached."""
        skipped, upe = self.skipped_updates(), self.scheduler.updates_per_epoch
        update = self._update_index()
        if (update + skipped) // upe == (self._first_update + skipped) // upe:  # the data's epochs
            return False
        epoch = getattr(self.sampler, "epoch", None)
        if epoch is not None and epoch == self._first_epoch:
            refuse_silent(allowed([Finding(
                "sampler_not_reshuffled",
                f"update {update} starts epoch {(update + skipped) // upe} but the sampler is still at epoch {epoch}: "
                "the epoch repeats the last one's order (Remark 4: one shuffle per epoch); call "
                "sampler.set_epoch(epoch) (or loader.set_epoch) before each epoch", True)], self.allow))
        return True

    def _report(self, findings: list[Finding]) -> None:
        joined = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not joined or torch.distributed.get_rank() == 0:
            for f in findings:
                if not f.silent:
                    log.warning("recipe audit: %s", f)

    def _weights(self) -> list[float]:
        """[samples, sum over samples of (weight in the gradient x kn), records whose weight is not 1/kn, records,
        records scaled by a loss scaler the check cannot read] of the losses reported so far."""
        self._settle()  # losses whose backward no integration reported: plain loss.backward()
        reduction = self.world_size if self.grad_reduction == "mean" else 1
        declared = self.loss_scale()
        samples = weighted = wrong = unread = 0.0
        for record in self._settled:
            per_divisor = 1.0 / record.divisor  # what reaches the loss when nothing else scales it
            tolerance = _WEIGHT_TOLERANCE
            if record.grad is not None:
                arrived = float(record.grad)
                tolerance = max(tolerance, 2 * torch.finfo(record.grad.dtype).eps)
                if declared is not None:
                    per_divisor = arrived / declared
                elif not math.isclose(arrived * record.divisor, 1.0, rel_tol=tolerance):
                    unread += 1  # a loss scaler's factor, or a wrong one: the divisor stays as reported
            weight = record.scale * per_divisor / reduction
            samples += record.num_samples
            weighted += record.num_samples * weight * self.global_batch_size
            wrong += abs(weight * self.global_batch_size - 1.0) > tolerance
        return [samples, weighted, wrong, float(len(self._settled)), unread]

    def _reduced(self) -> tuple[int, float, int, int, int]:
        values = self._weights()
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            device = next((p.device for g in self.optimizer.param_groups for p in g["params"]), torch.device("cpu"))
            if torch.distributed.get_backend() == "gloo":
                device = torch.device("cpu")
            tensor = torch.tensor(values, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(tensor)
            values = tensor.tolist()
        samples, weighted, wrong, records, unread = values
        return int(round(samples)), weighted, int(round(wrong)), int(round(records)), int(round(unread))

    def _runtime_findings(self) -> list[Finding]:
        findings = []
        kn = self.global_batch_size
        samples, weighted, wrong, records, unread = self._reduced()
        if kn is None:
            pass
        elif records == 0:
            # A per-micro-batch mean is right only where the engine itself divides by the accumulation steps.
            wrong_if_mean = self.accumulation_steps > 1 and self.loss_divisor != self.accumulation_steps
            findings.append(Finding(
                "loss_unchecked",
                "the first update's loss did not go through the recipe's loss helper, so its normalisation by kn "
                "is unchecked" + (f" (a per-micro-batch mean would give {self.accumulation_steps} x the paper's "
                                  "gradient here)" if wrong_if_mean else "") + f"; {self.fix_loss}", wrong_if_mean))
        else:
            if samples != kn:
                findings.append(Finding(
                    "samples_per_update",
                    f"the first update used {samples} samples over all ranks and micro-batches, not kn = {kn}: "
                    "step the optimizer once per kn samples (micro-batch x ranks x accumulation = kn) and pass "
                    "per-sample losses (reduction='none')", True))
            if wrong:
                factor = weighted / samples if samples else 0.0
                twice = factor < 1 and math.isclose(1 / factor, round(1 / factor), rel_tol=1e-6)
                findings.append(Finding(
                    "loss_divided_twice" if twice else "loss_scale",
                    f"each sample's gradient carries {factor:.6g} x 1/kn instead of 1/kn (Remark 3: the update is "
                    f"the mean over all kn samples){' - the loss is divided a second time' if twice else ''}; "
                    f"{self.fix_loss}", True))
            if unread:
                findings.append(Finding(
                    "loss_scale_unchecked",
                    f"{unread} micro-batch losses reached the backward scaled by more than the engine's division, as "
                    "a loss scaler (fp16) whose scale the recipe cannot read here scales them: the factor is "
                    "unchecked", False))
        if self._clip is not None:
            findings.append(Finding(
                "grad_clipping",
                f"the loop clips gradients to norm {self._clip:g}, which is no part of the paper's update; drop the "
                "clip_grad_norm_ call (or allow 'grad_clipping' on purpose)", True))
        findings += self._position_findings()
        return findings

    def _position_findings(self) -> list[Finding]:
        findings = []
        update = self._update_index()
        if self.schedule is not None and update is not None:
            upe = self.scheduler.updates_per_epoch
            expected = self.schedule.lr(update / upe)
            for group in self.optimizer.param_groups:
                want = expected * group.get("lr_scale", 1.0)
                if not math.isclose(group["lr"], want, rel_tol=1e-9, abs_tol=1e-15):
                    findings.append(Finding(
                        "lr_off_schedule",
                        f"update {update} is about to use LR {group['lr']:g}, not the schedule's {want:g}: something "
                        "else sets the LR; let GoyalLR alone set it", True))
                    break
            sampler = self.sampler
            epoch = getattr(sampler, "epoch", None)
            if epoch is not None:
                data_update = update + self.skipped_updates()  # a loss scaler's skipped updates used data too
                in_epoch = data_update % upe
                start = getattr(sampler, "start", 0) + self.data_skipped
                positioned = hasattr(sampler, "start") or self.data_skipped > 0  # the data can start mid-epoch
                kn = self.global_batch_size or self.schedule.global_batch_size
                per_update = kn // _sampler_replicas(sampler)
                skipped_epoch, resumed = self._resumed_at_skip
                if self.data_skipped and resumed:
                    findings.append(Finding(
                        "data_skipped_twice",
                        f"the sampler already resumed epoch {skipped_epoch} at sample {resumed} and the loader skips "
                        f"{self.data_skipped} more: those samples are never seen and the epoch ends early; the "
                        "recipe's state puts the data in place, so skip no batches on resume (no skip_first_batches)",
                        True))
                elif epoch != data_update // upe or (positioned and start != in_epoch * per_update):
                    findings.append(Finding(
                        "data_position",
                        f"the LR is at update {update} (epoch {data_update // upe}, update {in_epoch} of {upe}) but "
                        f"the data at epoch {epoch}, sample {start} of this rank: a resume restored one and not the "
                        "other; checkpoint the recipe's state (scheduler and sampler) and restore both", True))
                elif in_epoch and not positioned:
                    findings.append(Finding(
                        "data_position",
                        f"resumed at update {in_epoch} of epoch {data_update // upe}, but {type(sampler).__name__} "
                        "cannot start mid-epoch: the epoch's first samples are seen twice; use EpochShuffleSampler",
                        True))
        return findings
