"""Batch normalisation as the paper uses it: zero-gamma residual init and per-worker statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

LAYOUTS = ("auto", "per_group", "packed")

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

# Last norm of a residual block, by block class, for blocks without timm's `zero_init_last()` hook:
# torchvision's ResNets, and timm's EfficientNet / MobileNetV3 blocks (their skip is `has_skip`).
_LAST_NORM = {
    "Bottleneck": "bn3", "BasicBlock": "bn2",
    "InvertedResidual": "bn3", "CondConvResidual": "bn3", "DepthwiseSeparableConv": "bn2", "EdgeResidual": "bn2",
}


def zero_init_last_bn(model: nn.Module) -> list[str]:
    """Set gamma = 0 in the last BN of every residual block, so each block starts as the identity (Sec. 5.1).

    A block's own `zero_init_last()` hook (timm's ResNet, ResNet-D, RegNet, ...) decides which norm
    is last; otherwise the block class names it (torchvision's ResNets: Bottleneck bn3, BasicBlock
    bn2; timm's EfficientNet and MobileNetV3 blocks: InvertedResidual bn3, DepthwiseSeparableConv
    and EdgeResidual bn2), and blocks whose `has_skip` is False are left alone: without a shortcut
    a zero gamma would silence the block instead of making it the identity.

    Returns the dotted names of the norm modules whose gamma this set to zero, in model order (for
    a block with the hook: its norms whose gamma is all zero after it), including those that were
    zero already (timm creates ResNets with `zero_init_last=True`), so a second call returns the
    same list. Idempotent.
    """
    zeroed: dict[str, None] = {}
    for block_name, block in model.named_modules():
        prefix = f"{block_name}." if block_name else ""
        if callable(getattr(block, "zero_init_last", None)):
            zeroed.update(dict.fromkeys(prefix + name for name in _zeroed_by_hook(block)))
            continue
        attr = _LAST_NORM.get(type(block).__name__)
        norm = getattr(block, attr, None) if attr else None
        if isinstance(norm, _NORMS) and norm.weight is not None and getattr(block, "has_skip", True):
            nn.init.zeros_(norm.weight)
            zeroed[prefix + attr] = None
    return list(zeroed)


def _zeroed_by_hook(block: nn.Module) -> list[str]:
    """Calls `block.zero_init_last()` and names the block's norms whose gamma is then all zero."""
    block.zero_init_last()
    return [name for name, m in block.named_modules()
            if isinstance(m, _NORMS) and m.weight is not None and not m.weight.any()]


def ghost_batch_norm(x: torch.Tensor, group_size: int, running_mean: torch.Tensor | None,
                     running_var: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     momentum: float, eps: float, layout: str = "auto") -> torch.Tensor:
    """Training-mode batch norm of `x` with statistics over each consecutive group of `group_size` samples.

    What k = batch / group_size workers with their own BN would compute (the paper's per-worker BN,
    Sec. 5.1): each group normalised by its own mean and variance, and the running buffers (when
    given) moved by `momentum` to the mean of the copies those workers would keep. Computed in at
    least float32 (on CUDA inside the kernels), returned in `x.dtype`. `layout` as in `GhostBatchNorm2d`.
    """
    batch = x.shape[0]
    if batch % group_size:
        raise UserError(
            f"ghost BN got a training batch of {batch} samples, not a multiple of group_size={group_size}; "
            "make the per-device micro-batch a multiple of the BN group size"
        )
    layout = _checked_layout(layout)
    if layout == "auto":
        # Fewer bytes moved on either device. On a CPU: half the packed layout's cost (benchmarks/README.md).
        # On CUDA not measured yet: the trainer's step with packed and fp32 casts ran at 0.45x a plain step on an
        # H200 (benchmarks/README.md).
        layout = "per_group"
    normalise = _per_group_batch_norm if layout == "per_group" else _packed_batch_norm
    if x.device.type == "cuda":
        # CUDA's batch-norm kernels (native and cuDNN) already take bf16/fp16 inputs against fp32 parameters
        # and statistics, accumulating in fp32: a cast would add two copies of every activation.
        return normalise(x, batch // group_size, running_mean, running_var, weight, bias, momentum, eps)
    dtype = torch.promote_types(x.dtype, torch.float32)  # BN in at least fp32 for bf16/fp16 inputs
    out = normalise(x.to(dtype), batch // group_size, running_mean, running_var, weight, bias, momentum, eps)
    return out.to(x.dtype)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over groups of `group_size` samples.

    In training, the batch is cut into consecutive groups of `group_size` samples and each group
    is normalised with its own mean and variance, exactly as k separate workers with n =
    `group_size` images each would (the paper's per-worker BN, Sec. 5.1, n = 32). The running
    statistics move by the mean of the groups' statistics, which is the average of the running
    statistics those k workers would keep. In eval mode it is `BatchNorm2d`.

    `layout` picks how the groups are computed, with identical results: "per_group" runs one
    native batch_norm per group (one copy of the activations each way, the concatenation), "packed"
    lays the groups side by side as channels for a single batch_norm call (one kernel per layer, but
    two copies each way); "auto" (default) takes "per_group" on every device.

    Same parameters, buffers and state_dict keys as `BatchNorm2d`: checkpoints load both ways.
    A training batch that is not a whole number of groups is an error (silently different
    statistics would change the recipe); size micro-batches as a multiple of `group_size`.
    """

    def __init__(self, num_features: int, group_size: int = 32, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 layout: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.group_size = _checked_group_size(group_size)
        self.layout = _checked_layout(layout)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, layout={self.layout}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] == self.group_size:
            return super().forward(x)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            running_mean, running_var = self.running_mean, self.running_var
        else:
            running_mean = running_var = None
            factor = 0.0
        return ghost_batch_norm(x, self.group_size, running_mean, running_var, self.weight, self.bias,
                                factor, self.eps, self.layout)


class GhostBatchNormAct2d(GhostBatchNorm2d):
    """Ghost BN followed by what timm's `BatchNormAct2d` applies after normalising: `drop`, then `act`.

    `use_ghost_batchnorm` builds it from a `BatchNormAct2d`, keeping that layer's own `drop` and
    `act` modules, so the state_dict keys stay those of `BatchNormAct2d` (checkpoints load both ways).
    """

    def __init__(self, num_features: int, group_size: int = 32, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 layout: str = "auto", *, act: nn.Module | None = None, drop: nn.Module | None = None):
        super().__init__(num_features, group_size, eps, momentum, affine, track_running_stats, device, dtype, layout)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _checked_group_size(group_size: int) -> int:
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size}")
    return int(group_size)


def _checked_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


# Both layouts compute the same thing. Running statistics: k workers would each move their copy by
# `momentum` towards their group's statistics s_g and then average the copies, so the buffer must end
# at r' = (1 - m) r + (m / k) sum_g s_g (the update is linear).


def _per_group_batch_norm(x, groups, running_mean, running_var, weight, bias, momentum, eps):
    """One native batch_norm per group on its slice of the batch (a view in either memory format),
    outputs concatenated: on a CPU the concatenation and its backward are the only copies.

    The running buffers are updated in place, group after group, with momentum m / (k - (k - g) m)
    for g = 1..k: each s_g then enters with weight m / k and r with 1 - m, which is r' above with
    neither copies of the buffers nor a mean over them.
    """
    outs = []
    for g, chunk in enumerate(x.chunk(groups), start=1):
        step = momentum / (groups - (groups - g) * momentum)
        outs.append(F.batch_norm(chunk, running_mean, running_var, weight, bias, True, step, eps))
    return torch.cat(outs)


def _packed_batch_norm(x, groups, running_mean, running_var, weight, bias, momentum, eps):
    """Groups side by side as channels, so one native batch_norm normalises every (group, channel)
    over its own n samples: one kernel per layer however many groups.

    Costs one copy in and one out. The packing keeps the input's memory format (channels_last
    packs (n, H, W, groups, C)) so neither copy also converts layouts. Each group moves its own
    copy of the running buffers; their mean is r'.
    """
    batch, channels, height, width = x.shape
    n = batch // groups
    group_means = None if running_mean is None else running_mean.repeat(groups)
    group_vars = None if running_var is None else running_var.repeat(groups)
    weights = None if weight is None else weight.repeat(groups)
    biases = None if bias is None else bias.repeat(groups)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last:
        nhwc = x.permute(0, 2, 3, 1).view(groups, n, height, width, channels)
        packed = nhwc.permute(1, 2, 3, 0, 4).reshape(n, height, width, groups * channels).permute(0, 3, 1, 2)
    else:
        packed = x.reshape(groups, n, channels, height, width).transpose(0, 1).reshape(n, groups * channels, height, width)
    out = F.batch_norm(packed, group_means, group_vars, weights, biases, True, momentum, eps)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(group_means.view(groups, channels).mean(0))
            running_var.copy_(group_vars.view(groups, channels).mean(0))
    if channels_last:
        out = out.permute(0, 2, 3, 1).view(n, height, width, groups, channels).permute(3, 0, 1, 2, 4)
        return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return out.view(n, groups, channels, height, width).transpose(0, 1).reshape(batch, channels, height, width)



# The BN classes whose forward ghost BN reproduces, by module and class name (this module imports
# torch alone): nn.BatchNorm2d, and timm's BatchNormAct2d (batch_norm, then `drop`, then `act`: the
# order of its forward, which its ghost variant keeps). Subclasses are not in the table: their
# forward may do more.
_GHOST_OF = {
    ("torch.nn.modules.batchnorm", "BatchNorm2d"): GhostBatchNorm2d,
    ("timm.layers.norm_act", "BatchNormAct2d"): GhostBatchNormAct2d,
}


def use_ghost_batchnorm(model: nn.Module, group_size: int = 32, layout: str = "auto") -> int:
    """Make every BatchNorm2d of `model` ghost BN over groups of `group_size`, in place.

    `nn.BatchNorm2d` becomes `GhostBatchNorm2d` and timm's `BatchNormAct2d` (EfficientNet,
    MobileNetV3, RegNet) becomes `GhostBatchNormAct2d` with the layer's own activation and drop
    modules. The new layers hold the very parameter and buffer tensors of the old ones (an optimizer
    built before keeps training them) and the state_dict keys are unchanged. Layers that are already
    ghost BN get the new group size and layout. Any other subclass of BatchNorm2d, whose forward may
    do more than these, is refused with a `UserError` naming it, before any layer changes (as are a
    bad group size or layout). Returns the number of ghost BN layers in the model afterwards.
    """
    group_size, layout = _checked_group_size(group_size), _checked_layout(layout)
    plan = []
    refused = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full_name = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, GhostBatchNorm2d):
                plan.append((parent, name, child, None))
            elif isinstance(child, nn.BatchNorm2d):
                ghost_class = _GHOST_OF.get((type(child).__module__, type(child).__qualname__))
                if ghost_class is None:
                    refused.append(f"{full_name} ({type(child).__module__}.{type(child).__qualname__})")
                plan.append((parent, name, child, ghost_class))
    if refused:
        more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
        raise UserError(
            f"ghost BN cannot stand in for {refused[0]}{more}: ghost BN reproduces the forward of "
            "nn.BatchNorm2d and timm's BatchNormAct2d only; build those layers as one of these, or keep "
            "BN statistics over the whole per-device batch (no use_ghost_batchnorm; model.bn=per_device)"
        )
    ghosts: dict[int, GhostBatchNorm2d] = {}  # a layer shared by several parents stays shared
    for parent, name, child, ghost_class in plan:
        if ghost_class is None:
            child.group_size, child.layout = group_size, layout
            ghosts[id(child)] = child
            continue
        if id(child) not in ghosts:
            ghosts[id(child)] = _ghost_of(child, ghost_class, group_size, layout)
        setattr(parent, name, ghosts[id(child)])
    return len(ghosts)


def _ghost_of(bn: nn.BatchNorm2d, ghost_class: type, group_size: int, layout: str) -> GhostBatchNorm2d:
    """A `ghost_class` layer holding `bn`'s own parameters, buffers and child modules (same keys)."""
    ghost = ghost_class(bn.num_features, group_size, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                        device="meta", layout=layout)
    for name, tensor in (*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)):
        setattr(ghost, name, tensor)
    for name, child in bn.named_children():
        setattr(ghost, name, child)
    return ghost.train(bn.training)
