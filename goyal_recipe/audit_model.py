"""The audit's checks of what a loop's model, optimizer and checkpoints hold: weight decay off the norm layers
(and on biases as asked), the BN batch and zero-gamma (Sec. 5.1), and a checkpoint that saves the scheduler and
the sampler."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .findings import Finding, names_shown
from .lr import GoyalLR, _innermost_optimizer
from .optim import _is_norm


def weight_decay_findings(model, optimizer, bias_weight_decay) -> list[Finding]:
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
            f"({names_shown([n for n, _ in norm_decayed])}); the paper decays no BN gamma or beta (Sec. 5.1): build the "
            "optimizer over goyal_recipe.param_groups(model) (or build_optimizer), which groups by module type", True))
    if bias_off:
        findings.append(Finding(
            "bias_weight_decay",
            f"weight decay {bias_off[0][1]:g} on {len(bias_off)} biases ({names_shown([n for n, _ in bias_off])}) "
            f"where {bias_weight_decay:g} was wanted; build the optimizer over "
            f"param_groups(model, bias_weight_decay={bias_weight_decay:g})", True))
    return findings


def bn_findings(model, bn_group_size, n, fresh_start, goyal) -> list[Finding]:
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
                f"({names_shown(names)}), not over the recipe's group of {bn_group_size} (Sec. 5.1: per worker, "
                f"n = 32); use_ghost_batchnorm(model, group_size={bn_group_size}), or audit with the BN group "
                "you mean", True))
    if fresh_start is None:
        fresh_start = not isinstance(goyal, GoyalLR) or goyal.updates_done == 0
    if fresh_start:
        missing = _zero_gamma_missing(model)
        if missing:
            findings.append(Finding(
                "zero_gamma_missing",
                f"gamma is not zero in the last BN of {len(missing)} residual blocks ({names_shown(missing)}); the paper "
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


def checkpoint_findings(checkpointed, goyal, sampler) -> list[Finding]:
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
