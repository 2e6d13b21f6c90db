"""Batch normalisation as the paper uses it: zero-gamma residual init and per-worker statistics."""

from __future__ import annotations

import torch
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
        groups = batch // self.group_size
        # Statistics in at least fp32 for bf16/fp16 inputs: BN is kept in full precision.
        xg = x.to(torch.promote_types(x.dtype, torch.float32)).view(groups, self.group_size, *x.shape[1:])
        var, mean = torch.var_mean(xg, dim=(1, 3, 4), correction=0, keepdim=True)  # (G, 1, C, 1, 1)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight.view(1, 1, -1, 1, 1)
            shift = shift * self.weight.view(1, 1, -1, 1, 1) + self.bias.view(1, 1, -1, 1, 1)
        out = (xg * scale + shift).view_as(x).to(x.dtype)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), xg[0, :, 0].numel())
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, group_count: int) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as BatchNorm2d
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        # BatchNorm keeps the unbiased variance of each batch in its running estimate.
        unbiased = var * (group_count / max(group_count - 1, 1))
        self.running_mean.lerp_(mean.mean(dim=0).flatten().to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.mean(dim=0).flatten().to(self.running_var.dtype), factor)


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
