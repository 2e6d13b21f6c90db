"""Where a training loop departs from the paper, one line each with the fix.

`audit(...)` reads what a loop holds (model, optimizer, scheduler, sampler or loader, the batch
chain, clipping, what its checkpoints save) and returns `Finding`s. A finding is `silent` when it
changes the update and nothing else would show it (weight decay on BN, an LR scaled for another kn,
data split twice, clipping, a loss divided twice, a resume that restarts the LR or the data);
`refuse_silent` raises `RecipeMismatch` with the first one. The others are departures a user writes
on purpose (the paper's own ablations: square-root scaling, constant or no warmup, gamma = 1) and
are reported, not refused. `allow=("code", ...)` turns a silent finding the user wants into a
reported one.

This is the static half. The runtime half, `FirstUpdateCheck` in `goyal_recipe.first_update`, runs
this audit at a loop's first real update, when the loop is fully assembled, beside what only the
running loop shows (the samples and loss weights of the update, the LR and data position).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn
from torch.utils.data import SequentialSampler

from .audit_model import bn_findings, checkpoint_findings, weight_decay_findings
from .findings import Finding, allowed, refuse_silent  # noqa: F401 (the audit's public names)
from .loop_parts import LoaderParts, _sampler_replicas, loader_parts, unwrap_model, unwrap_scheduler
from .lr import GoyalLR
from .sampler import EpochShuffleSampler
from .schedule import Schedule, scaled_lr


# ---------------------------------------------------------------------------------------------------
# The audit


def audit(*, model: nn.Module | None = None, optimizer=None, scheduler=None, sampler=None, loader=None,
          global_batch_size: int | None = None, world_size: int = 1, accumulation_steps: int = 1,
          per_device_batch_size: int | None = None, bn_group_size: int | None = 32,
          grad_clip_norm: float | None = None, schedule: Schedule | None = None,
          bias_weight_decay: float | None = None, checkpointed: Iterable | None = None,
          fresh_start: bool | None = None, fix_loader: str = "", allow: Iterable[str] = ()) -> list[Finding]:
    """Where this loop departs from the paper's update; one `Finding` per departure, with its fix.

    Pass what the loop has; what is left out is not checked. `global_batch_size` is the kn the loop
    means (default: the schedule's); the loop's real kn is world_size x per_device_batch_size x
    accumulation_steps (the micro-batch is read from `loader` when not given). `schedule` defaults to
    a `GoyalLR` scheduler's. `bn_group_size`: the BN batch the recipe wants (None: not checked).
    `bias_weight_decay`: the decay wanted on non-norm biases (None: not checked, the paper is silent).
    `checkpointed`: the objects the loop's checkpoints save (None: not checked); an object counts for
    what it holds in `.scheduler` and `.sampler` too. `fresh_start`: whether the weights are newly
    initialised, where zero-gamma is checked (default: the scheduler has done no update).
    `fix_loader`: the integration's own advice for a data split, appended to those findings.
    """
    findings: list[Finding] = []
    goyal = unwrap_scheduler(scheduler)
    if schedule is None and isinstance(goyal, GoyalLR):
        schedule = goyal.schedule
    parts = loader_parts(loader) if loader is not None else LoaderParts(None, 1, None)
    sampler = sampler if sampler is not None else parts.sampler
    n = per_device_batch_size if per_device_batch_size is not None else parts.micro_batch
    real_kn = world_size * n * accumulation_steps if n is not None else None
    kn = global_batch_size if global_batch_size is not None else (
        schedule.global_batch_size if schedule is not None else real_kn)
    inner_model = unwrap_model(model) if model is not None else None

    if optimizer is not None and inner_model is not None:
        findings += weight_decay_findings(inner_model, optimizer, bias_weight_decay)
    if global_batch_size is not None and real_kn is not None and global_batch_size != real_kn:
        findings.append(Finding(
            "batch_mismatch",
            f"kn = {global_batch_size} but each update takes world {world_size} x micro-batch {n} x accumulation "
            f"{accumulation_steps} = {real_kn} samples; make the three multiply to kn", True))
    findings += _schedule_findings(schedule, scheduler, goyal, optimizer, real_kn, world_size, n, accumulation_steps)
    findings += _data_findings(sampler, parts, world_size, kn, accumulation_steps, n, goyal, loader, fix_loader)
    if inner_model is not None:
        findings += bn_findings(inner_model, bn_group_size, n, fresh_start, goyal)
    if grad_clip_norm:
        findings.append(Finding(
            "grad_clipping",
            f"gradients are clipped to norm {grad_clip_norm:g}: no part of the paper's update, it shrinks every "
            "update whose gradient norm exceeds the bound; turn clipping off (or allow 'grad_clipping' on purpose)",
            True))
    if checkpointed is not None:
        findings += checkpoint_findings(checkpointed, goyal, sampler)
    return allowed(findings, allow)


def _schedule_findings(schedule, scheduler, goyal, optimizer, real_kn, world_size, n, accumulation) -> list[Finding]:
    findings = []
    if schedule is None:
        if optimizer is not None or scheduler is not None:
            what = "no LR scheduler" if scheduler is None else f"the scheduler {type(goyal).__name__} is not a GoyalLR"
            findings.append(Finding(
                "scheduler_unchecked",
                f"{what}: the peak LR, warmup and decay cannot be checked against the recipe; use "
                "GoyalLR(optimizer, Schedule(global_batch_size=kn), updates_per_epoch)", False))
        return findings
    if real_kn is not None and schedule.global_batch_size != real_kn:
        right = scaled_lr(schedule.base_lr, real_kn, schedule.base_batch_size, schedule.scaling)
        findings.append(Finding(
            "lr_batch_size",
            f"the peak LR {schedule.peak_lr:g} is scaled for kn = {schedule.global_batch_size} but each update takes "
            f"{real_kn} samples (world {world_size} x micro-batch {n} x accumulation {accumulation}), whose rule "
            f"gives {right:g}; build Schedule(global_batch_size={real_kn})", True))
    if schedule.scaling != "linear":
        findings.append(Finding(
            "lr_scaling",
            f"{schedule.scaling} LR scaling (peak {schedule.peak_lr:g}); the paper's rule is linear "
            f"({scaled_lr(schedule.base_lr, schedule.global_batch_size, schedule.base_batch_size):g}); "
            "Schedule(scaling='linear')", False))
    if schedule.warmup != "gradual":
        findings.append(Finding(
            "warmup_kind",
            f"warmup={schedule.warmup!r}; the paper's large-kn recipe warms up gradually over 5 epochs (Table 1); "
            "Schedule(warmup='gradual')", False))
    reference = min(schedule.base_lr, schedule.peak_lr)
    if schedule.warmup != "none" and not math.isclose(schedule.start_lr, reference, rel_tol=1e-12):
        findings.append(Finding(
            "warmup_start",
            f"the warmup starts at LR {schedule.start_lr:g}, not at the reference minibatch's {reference:g} "
            "where the paper starts it (Sec. 2.2); leave Schedule(warmup_start_lr=None)", False))
    return findings


def _data_findings(sampler, parts, world_size, kn, accumulation, n, goyal, loader, fix_loader) -> list[Finding]:
    findings = []
    fix = f"; {fix_loader}" if fix_loader else ""
    if sampler is not None:
        replicas = _sampler_replicas(sampler)
        splits = replicas * parts.shards
        if splits != world_size:
            if replicas > 1 and parts.shards > 1:
                findings.append(Finding(
                    "data_split_twice",
                    f"the sampler splits the data {replicas} ways and the prepared loader splits it {parts.shards} "
                    f"ways again: each rank sees 1/{splits} of the data, and an epoch has 1/{splits // world_size} "
                    f"of its updates (Remark 4: one split){fix}", True))
            elif splits == 1:
                findings.append(Finding(
                    "data_not_split",
                    f"nothing splits the data over the {world_size} ranks: every rank reads the whole epoch "
                    f"(Remark 4: one shuffle per epoch divided among the workers){fix}", True))
            else:
                findings.append(Finding(
                    "data_split_mismatch",
                    f"the data is split {splits} ways (sampler {replicas} x loader {parts.shards}) for "
                    f"{world_size} ranks; split it exactly once over the ranks{fix}", True))
        if isinstance(sampler, SequentialSampler) or getattr(sampler, "shuffle", True) is False:
            findings.append(Finding(
                "sampler_not_shuffled",
                f"{type(sampler).__name__} does not shuffle: every epoch has the same order (Remark 4: one random "
                "shuffle per epoch); use EpochShuffleSampler", True))
        if (isinstance(sampler, EpochShuffleSampler) and sampler.drop_last and kn
                and (sampler.kept_samples * parts.shards) % kn):
            findings.append(Finding(
                "partial_update",
                f"the sampler keeps {sampler.kept_samples} samples per epoch, not a whole number of updates of "
                f"kn = {kn}: the epoch's last update would be short; build it with batch_size=micro-batch and "
                "accumulation_steps so that batch_size x num_replicas x accumulation_steps = kn", True))
    if loader is not None and parts.sampler is not None and not isinstance(parts.sampler, EpochShuffleSampler):
        findings += _loader_epoch_findings(parts, loader, kn, accumulation)
    if isinstance(goyal, GoyalLR) and n and world_size:
        per_rank = None
        if isinstance(sampler, EpochShuffleSampler):
            per_rank = sampler._rank_count() // parts.shards
        elif loader is not None and hasattr(loader, "__len__"):
            try:
                per_rank = len(loader) * n
            except TypeError:
                per_rank = None
        if per_rank is not None:
            data_updates = per_rank // (n * accumulation)
            if data_updates != goyal.updates_per_epoch:
                findings.append(Finding(
                    "updates_per_epoch",
                    f"the LR schedule counts {goyal.updates_per_epoch} updates per epoch but each rank's data gives "
                    f"{data_updates} ({per_rank} samples / (micro-batch {n} x accumulation {accumulation})): the "
                    f"warmup and milestones land at the wrong epochs; build GoyalLR with the data's updates per "
                    f"epoch (num_samples // kn){fix}", True))
    return findings


def _loader_epoch_findings(parts, loader, kn, accumulation) -> list[Finding]:
    """Whether an epoch of a loader not batched by the recipe's sampler is a whole number of full updates.

    torch's DistributedSampler and RandomSampler (shuffle=True) know nothing of updates: a short
    last batch, or micro-batches left over after the last whole update, end the epoch in an update of
    other than kn samples (accelerate ends it short at the loader's end, a DDP loop carries it into the
    next epoch) that the LR schedule's updates per epoch do not count.
    """
    try:
        samples, micro_batches = len(parts.sampler), len(loader)
    except TypeError:  # an iterable-style loader: its epoch's length is unknown
        return []
    short = samples % parts.batch_size if parts.batch_size and parts.drop_last is False else 0
    extra = micro_batches % accumulation
    if not short and not extra:
        return []
    causes, whole = [], f"kn = {kn}" if kn else "kn"
    if short:
        causes.append(f"{type(parts.sampler).__name__} yields {samples} samples per epoch, cut into batches of "
                      f"{parts.batch_size} with a last one of {short} (drop_last=False)")
    if extra:
        causes.append(f"each rank reads {micro_batches} micro-batches per epoch, {extra} past the last whole "
                      f"update of {accumulation}")
    return [Finding(
        "partial_update",
        f"{'; '.join(causes)}: the epoch's last update does not hold {whole} fresh samples (it is short, padded "
        "with repeats or runs into the next epoch), each still weighted 1/kn, and the LR schedule does not count "
        "it; use recipe.sampler (an EpochShuffleSampler), or drop_last=True with a sample count that fills whole "
        "updates", True)]


def __getattr__(name: str):
    """The runtime half's names, importable from here as well (`from goyal_recipe.audit import FirstUpdateCheck`)."""
    if name in ("FirstUpdateCheck", "record_loss"):
        from . import first_update

        return getattr(first_update, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
