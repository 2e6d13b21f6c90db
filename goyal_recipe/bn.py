"""Batch normalisation as the paper uses it: zero-gamma residual init and per-worker statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYOUTS = ("auto", "per_group", "packed")

# Last BN of a residual block, by block class: timm's and torchvision's ResNets share these names.
_LAST_BN = {"Bottleneck": "bn3", "BasicBlock": "bn2"}


def zero_init_last_bn(model: nn.Module) -> list[str]:
    """Set gamma = 0 in the last BN of every residual block, so each block starts as the identity (Sec. 5.1).

    Covers timm and torchvision ResNet blocks (Bottleneck: bn3, BasicBlock: bn2) and any block
    exposing timm's `zero_init_last()`. Returns the names of the BN modules whose gamma is zero.
    Idempotent.
    """
    touched = []
    for name, block in model.named_modules():
        attr = _LAST_BN.get(type(block).__name__)
        norm = getattr(block, attr, None) if attr else None
        if isinstance(norm, nn.modules.batchnorm._NormBase) and norm.weight is not None:
            nn.init.zeros_(norm.weight)
            touched.append(f"{name}.{attr}" if name else attr)
        elif callable(getattr(block, "zero_init_last", None)):
            block.zero_init_last()
            touched += [
                f"{name}.{child_name}" if name else child_name
                for child_name, child in block.named_children()
                if isinstance(child, nn.modules.batchnorm._NormBase)
                and child.weight is not None and not child.weight.any()
            ]
    return touched


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over groups of `group_size` samples.

    In training, the batch is cut into consecutive groups of `group_size` samples and each group
    is normalised with its own mean and variance, exactly as k separate workers with n =
    `group_size` images each would (the paper's per-worker BN, Sec. 5.1, n = 32). The running
    statistics move by the mean of the groups' statistics, which is the average of the running
    statistics those k workers would keep. In eval mode it is `BatchNorm2d`.

    `layout` picks how the groups are computed, with identical results: "per_group" runs one
    native batch_norm per group (least memory traffic: the fastest on a CPU), "packed" lays the
    groups side by side as channels for a single batch_norm call (one kernel per layer: for GPUs),
    "auto" (default) takes "per_group" on CPU tensors and "packed" elsewhere.

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
        batch = x.shape[0]
        if not self.training or batch == self.group_size:
            return super().forward(x)
        if batch % self.group_size:
            raise ValueError(
                f"GhostBatchNorm2d got a training batch of {batch} samples, not a multiple of "
                f"group_size={self.group_size}; make the per-device micro-batch a multiple of the BN group size"
            )
        groups = batch // self.group_size
        dtype = torch.promote_types(x.dtype, torch.float32)  # BN in at least fp32 for bf16/fp16 inputs
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            running_mean, running_var = self.running_mean, self.running_var
        else:
            running_mean = running_var = None
            factor = 0.0
        layout = self.layout if self.layout != "auto" else "per_group" if x.device.type == "cpu" else "packed"
        normalise = _per_group_batch_norm if layout == "per_group" else _packed_batch_norm
        out = normalise(x.to(dtype), groups, running_mean, running_var, self.weight, self.bias, factor, self.eps)
        return out.to(x.dtype)


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
    over its own n samples: one kernel per layer however many groups, what a GPU wants.

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


def use_ghost_batchnorm(model: nn.Module, group_size: int = 32, layout: str = "auto") -> int:
    """Replace every `nn.BatchNorm2d` of `model` by a `GhostBatchNorm2d(group_size, layout=layout)`, in place.

    Weights and running statistics are kept. Layers that are already ghost BN get the new group
    size and layout. Returns the number of ghost BN layers in the model afterwards. Subclasses of BatchNorm2d
    that add behaviour (e.g. timm's BatchNormAct2d) cannot be swapped without losing it: they
    raise, naming the layer.
    """
    group_size, layout = _checked_group_size(group_size), _checked_layout(layout)  # before any layer changes
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, GhostBatchNorm2d):
                child.group_size, child.layout = group_size, layout
                count += 1
            elif type(child) is nn.BatchNorm2d:
                ref = child.running_mean if child.running_mean is not None else child.weight
                ghost = GhostBatchNorm2d(child.num_features, group_size, child.eps, child.momentum, child.affine,
                                         child.track_running_stats,
                                         device=None if ref is None else ref.device,
                                         dtype=None if ref is None else ref.dtype, layout=layout)
                ghost.load_state_dict(child.state_dict())
                ghost.train(child.training)
                setattr(parent, name, ghost)
                count += 1
            elif isinstance(child, nn.BatchNorm2d):
                raise TypeError(
                    f"cannot turn {name} ({type(child).__name__}) into ghost BN without losing its extra behaviour; "
                    "build the model with norm_layer=nn.BatchNorm2d"
                )
    return count
