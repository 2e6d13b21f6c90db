"""Engine adapters: the only modules that import accelerate or deepspeed."""

from __future__ import annotations


def make_engine(cfg):
    """The engine named by `cfg.engine`, imported only when chosen."""
    if cfg.engine == "accelerate":
        from .accelerate import AccelerateEngine

        return AccelerateEngine(cfg)
    raise NotImplementedError(f"engine={cfg.engine} is not available yet; use engine=accelerate")
