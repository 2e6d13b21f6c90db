"""The model of a recipe: a timm model with the paper's initialisation and BN mode."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .bn import use_ghost_batchnorm, zero_init_last_bn
from .config import BatchPlan, ConfigError, ModelConfig

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, num_classes: int, plan: BatchPlan, world_size: int) -> nn.Module:
    """`timm.create_model` with zero-gamma (or gamma = 1) residual init, FC ~ N(0, std^2) and the BN mode."""
    import timm

    if not timm.is_model(cfg.name):
        raise ConfigError(f"model.name={cfg.name!r} is not a timm model; see timm.list_models()")
    try:
        try:
            model = timm.create_model(cfg.name, num_classes=num_classes, zero_init_last=cfg.zero_init_last,
                                      **cfg.kwargs)
        except TypeError as e:
            if "zero_init_last" not in str(e):
                raise
            # models without residual blocks take no zero_init_last
            model = timm.create_model(cfg.name, num_classes=num_classes, **cfg.kwargs)
    except Exception as e:  # noqa: BLE001 - a constructor refuses arguments with any exception type
        if not cfg.kwargs:
            raise  # the recipe passed nothing of its own: a failure here is not the user's
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(f"model.kwargs {cfg.kwargs} do not fit {cfg.name} ({reason}); "
                          f"pass only arguments of timm's {cfg.name} constructor") from None
    if cfg.zero_init_last:
        log.info("zero-gamma init on %d residual blocks", len(zero_init_last_bn(model)))
    if cfg.fc_init_std is not None:
        fc = model.get_classifier()
        if isinstance(fc, nn.Linear):
            nn.init.normal_(fc.weight, std=cfg.fc_init_std)
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)
    if cfg.bn == "ghost":
        replaced = use_ghost_batchnorm(model, plan.bn_group_size)
        log.info("ghost BN: %d layers, statistics over groups of %d", replaced, plan.bn_group_size)
    elif cfg.bn == "sync" and world_size > 1:
        # timm's conversion keeps BatchNormAct2d's activation and drop (torch's would turn it into plain SyncBN).
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile` with a clean fallback to eager where the backend is missing."""
    try:
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001 - any backend failure means: run eager
        log.warning("torch.compile unavailable (%s); training eager", e)
        return model
