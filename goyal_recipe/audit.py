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

import copy
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import SequentialSampler

from .errors import RecipeMismatch
from .loop_parts import LoaderParts, _sampler_replicas, loader_parts, unwrap_model, unwrap_scheduler
from .lr import GoyalLR, _innermost_optimizer
from .optim import _is_norm
from .sampler import EpochShuffleSampler
from .schedule import Schedule, scaled_lr


@dataclass(frozen=True)
class Finding:
    code: str  # stable snake_case id
    message: str  # one line: where the loop departs from the paper, and the fix
    silent: bool  # changes the update with no other symptom: the integrations refuse it

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def refuse_silent(findings: list[Finding]) -> None:
    """Raise `RecipeMismatch` naming the first silent finding (and the codes of the others); no-op if none."""
    silent = [f for f in findings if f.silent]
    if not silent:
        return
    more = f" (and {len(silent) - 1} more: {', '.join(f.code for f in silent[1:])})" if len(silent) > 1 else ""
    raise RecipeMismatch(f"{silent[0]}{more}")


def allowed(findings: list[Finding], allow: Iterable[str]) -> list[Finding]:
    """The findings with those whose code is in `allow` kept as reported, not refused."""
    allow = set(allow)
    return [dataclasses.replace(f, silent=False) if f.code in allow else f for f in findings]


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
        findings += _weight_decay_findings(inner_model, optimizer, bias_weight_decay)
    if global_batch_size is not None and real_kn is not None and global_batch_size != real_kn:
        findings.append(Finding(
            "batch_mismatch",
            f"kn = {global_batch_size} but each update takes world {world_size} x micro-batch {n} x accumulation "
            f"{accumulation_steps} = {real_kn} samples; make the three multiply to kn", True))
    findings += _schedule_findings(schedule, scheduler, goyal, optimizer, real_kn, world_size, n, accumulation_steps)
    findings += _data_findings(sampler, parts, world_size, kn, accumulation_steps, n, goyal, loader, fix_loader)
    if inner_model is not None:
        findings += _bn_findings(inner_model, bn_group_size, n, fresh_start, goyal)
    if grad_clip_norm:
        findings.append(Finding(
            "grad_clipping",
            f"gradients are clipped to norm {grad_clip_norm:g}: no part of the paper's update, it shrinks every "
            "update whose gradient norm exceeds the bound; turn clipping off (or allow 'grad_clipping' on purpose)",
            True))
    if checkpointed is not None:
        findings += _checkpoint_findings(checkpointed, goyal, sampler)
    return allowed(findings, allow)


def _weight_decay_findings(model, optimizer, bias_weight_decay) -> list[Finding]:
    inner = _innermost_optimizer(optimizer)
    decay_of = {id(p): float(g.get("weight_decay", 0.0) or 0.0) for g in inner.param_groups for p in g["params"]}
    if not any(id(p) in decay_of for p in model.parameters()):
        return []  # the optimizer holds copies (a sharded or flattened engine): nothing to match here
    findings = []
    norm_decayed, bias_off = [], []
    for module_name, module in model.named_modules():
        norm = _is_norm(module)
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            decay = decay_of.get(id(param))
            if decay is None:
                continue
            if norm and decay > 0:
                norm_decayed.append((name, decay))
            elif not norm and param.ndim <= 1 and bias_weight_decay is not None and decay != bias_weight_decay:
                bias_off.append((name, decay))
    if norm_decayed:
        findings.append(Finding(
            "norm_weight_decay",
            f"weight decay {norm_decayed[0][1]:g} on {len(norm_decayed)} normalisation parameters "
            f"({_names([n for n, _ in norm_decayed])}); the paper decays no BN gamma or beta (Sec. 5.1): build the "
            "optimizer over goyal_recipe.param_groups(model) (or build_optimizer), which groups by module type", True))
    if bias_off:
        findings.append(Finding(
            "bias_weight_decay",
            f"weight decay {bias_off[0][1]:g} on {len(bias_off)} biases ({_names([n for n, _ in bias_off])}) "
            f"where {bias_weight_decay:g} was wanted; build the optimizer over "
            f"param_groups(model, bias_weight_decay={bias_weight_decay:g})", True))
    return findings


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


def _bn_findings(model, bn_group_size, n, fresh_start, goyal) -> list[Finding]:
    findings = []
    if bn_group_size is not None:
        wrong: dict[str, list[str]] = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            if isinstance(module, nn.SyncBatchNorm):
                group = "all ranks' samples (SyncBatchNorm)"
            elif getattr(module, "group_size", None):  # ghost BN
                group = int(module.group_size)
                if group == bn_group_size:
                    continue
            elif n is None or n == bn_group_size:
                continue
            else:
                group = n
            wrong.setdefault(str(group), []).append(name)
        for group, names in wrong.items():
            findings.append(Finding(
                "bn_group_size",
                f"BN statistics over {group}{' samples' if group.isdigit() else ''} in {len(names)} layers "
                f"({_names(names)}), not over the recipe's group of {bn_group_size} (Sec. 5.1: per worker, "
                f"n = 32); use_ghost_batchnorm(model, group_size={bn_group_size}), or audit with the BN group "
                "you mean", True))
    if fresh_start is None:
        fresh_start = not isinstance(goyal, GoyalLR) or goyal.updates_done == 0
    if fresh_start:
        missing = _zero_gamma_missing(model)
        if missing:
            findings.append(Finding(
                "zero_gamma_missing",
                f"gamma is not zero in the last BN of {len(missing)} residual blocks ({_names(missing)}); the paper "
                "starts each block as the identity (Sec. 5.1): zero_init_last_bn(model) before training", False))
    return findings


def _zero_gamma_missing(model: nn.Module) -> list[str]:
    """Names of last-in-block BN layers that `zero_init_last_bn` would zero but whose gamma is not zero.

    The core's rule is applied to a copy of the model (once per audit, on the model's device), so the
    check follows whatever blocks `zero_init_last_bn` knows.
    """
    from .bn import zero_init_last_bn  # the core's own rule for which BN is last in a block

    try:
        probe = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a model that cannot be copied is not checked, not refused
        return []
    with torch.no_grad():
        names = zero_init_last_bn(probe)
    modules = dict(model.named_modules())
    return [name for name in names
            if getattr(modules.get(name), "weight", None) is not None and bool(modules[name].weight.detach().any())]


def _checkpoint_findings(checkpointed, goyal, sampler) -> list[Finding]:
    covered: set[int] = set()
    stack = list(checkpointed)
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in covered:
            continue
        covered.add(id(obj))
        stack += [getattr(obj, "scheduler", None), getattr(obj, "sampler", None)]
    findings = []
    if isinstance(goyal, GoyalLR) and id(goyal) not in covered:
        findings.append(Finding(
            "scheduler_not_checkpointed",
            "the checkpoints do not save the GoyalLR scheduler: a resumed run restarts the warmup at update 0; "
            "save its state_dict (accelerate: prepare it or register_for_checkpointing)", True))
    if sampler is not None and hasattr(sampler, "state_dict") and id(sampler) not in covered:
        findings.append(Finding(
            "sampler_not_checkpointed",
            "the checkpoints do not save the sampler's position: a resumed run restarts the epoch's data at its "
            "first sample; save its state_dict (accelerate: register_for_checkpointing)", True))
    return findings


def __getattr__(name: str):
    """The runtime half's names, importable from here as well (`from goyal_recipe.audit import FirstUpdateCheck`)."""
    if name in ("FirstUpdateCheck", "record_loss"):
        from . import first_update

        return getattr(first_update, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
