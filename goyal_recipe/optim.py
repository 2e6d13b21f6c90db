"""Optimizers of the recipe: weight-decay groups, SGD in the paper's form (10), LARS and LAMB, and a builder.

Why torch.optim.SGD needs no momentum correction (Remark 2): it keeps the velocity in gradient
units, u <- m u + g, and applies the LR when it updates the weights, w <- w - eta u (eq. 9). A new
LR therefore scales the whole velocity at once, which is exactly what the correction
eta_{t+1}/eta_t restores in form (10), where the LR is folded into the velocity.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re

import torch
from torch import nn
from torch.optim import Optimizer

from .errors import UserError

log = logging.getLogger(__name__)


class OptimizerError(UserError):
    """An optimizer setting the recipe cannot apply; the message names the key and the fix."""

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, GhostBatchNorm2d
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module) -> bool:
    # Custom norms (timm's RmsNorm, LayerNorm2d subclasses ...) are recognised by class, not by
    # parameter name: timm's shortcut BN is called `downsample.1`.
    return isinstance(module, _NORM_TYPES) or re.search(r"Norm(Act)?(\d+d)?$", type(module).__name__) is not None


def param_groups(
    model: nn.Module,
    weight_decay: float = 1e-4,
    norm_weight_decay: float = 0.0,
    bias_weight_decay: float | None = None,
) -> list[dict]:
    """Split trainable parameters into weight-decay groups by module type and tensor rank.

    - "norm": every parameter of a normalisation layer (BN gamma and beta); the paper applies no
      weight decay to them (Sec. 5.1), hence `norm_weight_decay=0.0`.
    - "bias": other parameters with ndim <= 1 (biases, scalars); the paper is silent, so
      `bias_weight_decay=None` means the same decay as weights.
    - "decay": the rest (conv and linear weights), with `weight_decay` (lambda = 1e-4).

    Each parameter appears exactly once (shared parameters too). Empty groups are left out. Each
    group carries "name", "num_tensors" and "num_params"; the counts are also logged.
    """
    decays = {"decay": weight_decay, "norm": norm_weight_decay,
              "bias": weight_decay if bias_weight_decay is None else bias_weight_decay}
    members: dict[str, list[nn.Parameter]] = {name: [] for name in decays}
    seen: set[int] = set()
    for module in model.modules():
        norm = _is_norm(module)
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            members["norm" if norm else "bias" if param.ndim <= 1 else "decay"].append(param)
    groups = []
    for name, params in members.items():
        if params:
            groups.append({
                "params": params,
                "weight_decay": decays[name],
                "name": name,
                "num_tensors": len(params),
                "num_params": sum(p.numel() for p in params),
            })
    for g in groups:
        log.info("param group %-5s weight_decay=%g tensors=%d params=%d",
                 g["name"], g["weight_decay"], g["num_tensors"], g["num_params"])
    return groups


class LRFoldedSGD(Optimizer):
    """SGD with the LR folded into the velocity, the paper's eq. (10) (Caffe2, MXNet, Keras form).

        v <- m * c * v + eta_t * (g + lambda * w)
        w <- w - v                                   (nesterov: w <- w - (eta_t * (g + lambda * w) + m * v))

    with the momentum correction c = eta_t / eta_{t-1} (Remark 2, eq. 10 with the correction term)
    when `momentum_correction=True`, c = 1 otherwise. With the correction the trajectory is that
    of torch.optim.SGD (eq. 9) under any LR schedule; without it, a change of LR reaches the
    weights only gradually, which at a warmup's end or a x0.1 decay is a different trajectory.

    `foreach=True` runs each line above once over all tensors of a group (torch._foreach_* ops: a few
    kernel launches instead of several per tensor); False runs it tensor by tensor. Same operations in
    the same order: on the CPU both give bit-identical weights.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, momentum_correction: bool = True, foreach: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        momentum_correction=momentum_correction, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._update_foreach if group.get("foreach", True) else self._update_loop)(group, params)
        return loss

    @staticmethod
    def _momentum_factor(group: dict, state: dict) -> float:
        """m * c, with c = eta_t / eta_{t-1} the momentum correction (1 without it, or after an LR of 0)."""
        prev_lr = state["lr"]
        correction = group["lr"] / prev_lr if group["momentum_correction"] and prev_lr > 0 else 1.0
        return group["momentum"] * correction

    def _update_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            step = torch.add(p.grad, p, alpha=wd).mul_(lr)  # eta_t * (g + lambda * w)
            if m:
                state = self.state[p]
                if "velocity" in state:
                    state["velocity"].mul_(self._momentum_factor(group, state)).add_(step)
                else:
                    state["velocity"] = step.clone()
                state["lr"] = lr
                step = step.add_(state["velocity"], alpha=m) if group["nesterov"] else state["velocity"]
            p.sub_(step)

    def _update_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        steps = torch._foreach_add([p.grad for p in params], params, alpha=wd)
        torch._foreach_mul_(steps, lr)  # eta_t * (g + lambda * w)
        if m:
            states = [self.state[p] for p in params]
            # Tensors with a velocity fold the new step into it; the others (first update) start from it.
            old = [i for i, state in enumerate(states) if "velocity" in state]
            if old:
                velocities = [states[i]["velocity"] for i in old]
                torch._foreach_mul_(velocities, [self._momentum_factor(group, states[i]) for i in old])
                torch._foreach_add_(velocities, [steps[i] for i in old])
            for step, state in zip(steps, states):
                if "velocity" not in state:
                    state["velocity"] = step.clone()
                state["lr"] = lr
            velocities = [state["velocity"] for state in states]
            if group["nesterov"]:
                torch._foreach_add_(steps, velocities, alpha=m)
            else:
                steps = velocities
        torch._foreach_sub_(params, steps)


OPTIMIZERS = ("sgd", "folded_sgd", "lars", "lamb")
LAYERWISE = ("lars", "lamb")
_SGD_HAS_FUSED = "fused" in inspect.signature(torch.optim.SGD).parameters


@functools.lru_cache(maxsize=None)
def _fused_sgd_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.optim.SGD's fused kernel (one launch per update for all tensors on CUDA, one pass per
    tensor on a CPU since torch 2.4) takes parameters of this device and dtype. torch checks only at the
    first step, so one step is taken here on one element."""
    if not _SGD_HAS_FUSED:
        return False
    probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.SGD([probe], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, fused=True).step()
    except RuntimeError:
        return False
    return True


def build_optimizer(
    model: nn.Module,
    kind: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 1e-4,
    norm_weight_decay: float = 0.0,
    bias_weight_decay: float | None = None,
    momentum_correction: bool = True,
    foreach: bool | None = None,
    trust_coefficient: float = 0.001,
) -> Optimizer:
    """The recipe's optimizer over `param_groups(model, ...)`; build it once the model is on its device.

    kind="sgd": torch.optim.SGD (eq. 9, no correction needed); kind="folded_sgd": `LRFoldedSGD`
    (eq. 10, with `momentum_correction`); kind="lars" / "lamb": timm's `Lars` (SGD with momentum and
    the layer-wise LR `trust_coefficient` x |w| / (|g| + lambda |w|), You et al. 2017, arXiv 1708.03888)
    and `Lamb` (Adam with the trust ratio |w| / |update|, You et al. 2019, arXiv 1904.00962, no gradient
    clipping: the recipe's `grad_clip_norm` is the one place for it). The initial `lr` is overwritten by `GoyalLR`.
    `foreach=None` takes the fast path: torch's fused SGD kernel where torch has one for the parameters'
    device (CUDA; the CPU too since torch 2.4: one pass over each tensor, against the foreach path's
    five on a CPU), else one torch._foreach_* op per line of the update over all tensors; `False`
    updates tensor by tensor. All give the same update; the fused kernel's multiply-adds may round the
    last bit differently (at most 2e-13 relative in float64 over 50 updates, tests/test_optim.py).
    """
    if kind in LAYERWISE and bias_weight_decay is None:
        bias_weight_decay = 0.0  # LARS and LAMB leave biases out of decay and trust ratio
    groups = param_groups(model, weight_decay, norm_weight_decay, bias_weight_decay)
    if kind == "sgd":
        kinds = {(p.device, p.dtype) for group in groups for p in group["params"]}
        if foreach is None and kinds and all(_fused_sgd_runs_on(*kind) for kind in kinds):
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=True)
            # GradScaler hands a fused optimizer its overflow flag and lets the kernel skip the update, and torch's
            # fused SGD kernel then still writes the momentum buffer (uninitialised memory on a first step): the
            # updates after a skipped fp16 step go wrong. Without the flag GradScaler unscales the gradients
            # itself and does not call step() on an overflow, as for any optimizer.
            optimizer._step_supports_amp_scaling = False
            return optimizer
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                               foreach=True if foreach is None else foreach)
    if kind == "folded_sgd":
        return LRFoldedSGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                           momentum_correction=momentum_correction, foreach=foreach is not False)
    if kind in LAYERWISE:
        return _layerwise(kind, groups, lr, momentum, nesterov, trust_coefficient, foreach)
    raise ValueError(f"unknown optimizer {kind!r}; use one of {', '.join(OPTIMIZERS)}")


def _layerwise(kind: str, groups: list[dict], lr: float, momentum: float, nesterov: bool, trust_coefficient: float,
               foreach: bool | None) -> Optimizer:
    """timm's Lars or Lamb over the recipe's groups, BN and biases outside both weight decay and the trust ratio.

    timm applies a group's trust ratio where its weight_decay != 0 or its `always_adapt` is set: the
    weights group ("decay") adapts always (also with weight_decay = 0), the "norm" and "bias" groups
    never, which needs their weight decay to be 0 (You et al. exclude them; so does timm's own recipe).
    """
    from timm.optim import Lamb, Lars

    for group in groups:
        if group["name"] != "decay" and group["weight_decay"] != 0:
            key = "norm_weight_decay" if group["name"] == "norm" else "bias_weight_decay"
            raise OptimizerError(f"optim.optimizer={kind} leaves BN and bias parameters out of weight decay and the "
                                 f"trust ratio, but optim.{key}={group['weight_decay']:g}; set optim.{key}=0")
        group["always_adapt"] = group["name"] == "decay"
    if kind == "lars":
        return Lars(groups, lr=lr, momentum=momentum, nesterov=nesterov, trust_coeff=trust_coefficient,
                    foreach=foreach)
    return Lamb(groups, lr=lr, max_grad_norm=None, foreach=foreach)
