"""Batch normalisation as the paper uses it: zero-gamma residual init and per-worker statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    Same parameters, buffers and state_dict keys as `BatchNorm2d`: checkpoints load both ways.
    A training batch that is not a whole number of groups is an error (silently different
    statistics would change the recipe); size micro-batches as a multiple of `group_size`.
    """

    def __init__(self, num_features: int, group_size: int = 32, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if int(group_size) != group_size or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size}")
        self.group_size = int(group_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if not self.training or batch == self.group_size:
            return super().forward(x)
        if batch % self.group_size:
            raise ValueError(
                f"GhostBatchNorm2d got a training batch of {batch} samples, not a multiple of "
                f"group_size={self.group_size}; make the per-device micro-batch a multiple of the BN group size"
            )
        groups, n = batch // self.group_size, self.group_size
        _, channels, height, width = x.shape
        # Groups side by side as channels: one native batch_norm call then normalises every
        # (group, channel) over its own n samples, as k workers would.
        dtype = torch.promote_types(x.dtype, torch.float32)  # BN in at least fp32 for bf16/fp16 inputs
        xs = x.to(dtype).view(groups, n, channels, height, width).transpose(0, 1).reshape(n, groups * channels, height, width)
        track = self.track_running_stats
        if track:
            self.num_batches_tracked.add_(1)
            # Each group moves its own copy of the running statistics; their mean is what k workers'
            # averaged statistics would be (the update is linear).
            running_mean, running_var = self.running_mean.repeat(groups), self.running_var.repeat(groups)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        else:
            running_mean = running_var = None
            factor = 0.0
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        out = F.batch_norm(xs, running_mean, running_var, weight, bias, True, factor, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(groups, channels).mean(0))
                self.running_var.copy_(running_var.view(groups, channels).mean(0))
        out = out.view(n, groups, channels, height, width).transpose(0, 1).reshape(x.shape).to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def use_ghost_batchnorm(model: nn.Module, group_size: int = 32) -> int:
    """Replace every `nn.BatchNorm2d` of `model` by a `GhostBatchNorm2d(group_size)`, in place.

    Weights and running statistics are kept. Layers that are already ghost BN get the new group
    size. Returns the number of ghost BN layers in the model afterwards. Subclasses of BatchNorm2d
    that add behaviour (e.g. timm's BatchNormAct2d) cannot be swapped without losing it: they
    raise, naming the layer.
    """
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, GhostBatchNorm2d):
                child.group_size = int(group_size)
                count += 1
            elif type(child) is nn.BatchNorm2d:
                ref = child.running_mean if child.running_mean is not None else child.weight
                ghost = GhostBatchNorm2d(child.num_features, group_size, child.eps, child.momentum, child.affine,
                                         child.track_running_stats,
                                         device=None if ref is None else ref.device,
                                         dtype=None if ref is None else ref.dtype)
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
