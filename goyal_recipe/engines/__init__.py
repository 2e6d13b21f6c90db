"""Engine adapters: the only modules that import accelerate or deepspeed. `base.Engine` is the contract."""

from __future__ import annotations

from ..config import ConfigError


def make_engine(cfg):
    """The engine named by `cfg.engine`, imported only when chosen."""
    from .base import check_launch

    check_launch()
    if cfg.engine == "local":
        from .local import LocalEngine

        return LocalEngine(cfg)
    if cfg.engine == "accelerate":
        from .accelerate import AccelerateEngine

        return AccelerateEngine(cfg)
    try:
        from .deepspeed import DeepSpeedEngine
    except ImportError as e:
        raise ConfigError(f"engine=deepspeed needs DeepSpeed ({e}); pip install 'goyal_recipe[deepspeed]'") from None
    return DeepSpeedEngine(cfg)
