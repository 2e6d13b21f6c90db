"""The large-minibatch SGD recipe of Goyal et al. 2017 (arXiv 1706.02677) for torch training loops."""

from .audit import Finding, audit, refuse_silent
from .bn import GhostBatchNorm2d, use_ghost_batchnorm, zero_init_last_bn
from .first_update import FirstUpdateCheck
from .loss import global_batch_loss
from .lr import GoyalLR
from .noise_scale import GradientNoiseScale, noise_scale_estimates
from .optim import LRFoldedSGD, build_optimizer, param_groups
from .sampler import EpochShuffleSampler
from .schedule import Schedule, scaled_lr

__all__ = [
    "scaled_lr",
    "Schedule",
    "GoyalLR",
    "param_groups",
    "LRFoldedSGD",
    "build_optimizer",
    "zero_init_last_bn",
    "GhostBatchNorm2d",
    "use_ghost_batchnorm",
    "EpochShuffleSampler",
    "global_batch_loss",
    "audit",
    "Finding",
    "refuse_silent",
    "FirstUpdateCheck",
    "noise_scale_estimates",
    "GradientNoiseScale",
]
__version__ = "0.1.0"
