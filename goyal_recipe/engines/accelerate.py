"""Hugging Face accelerate as the engine: processes, devices, DDP, collectives, trackers.

The recipe owns what accelerate could also do, so that every engine runs the same maths:
accumulation (no `gradient_accumulation_steps`, which would divide the loss a second time),
precision (bf16 autocast with BN in fp32), data sharding (the loaders are never prepared, so
the `EpochShuffleSampler` split is the only one) and the LR (GoyalLR counts real updates).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration,
                               is_compiled_module)
from safetensors.torch import save_file

from ..checkpoint import fit, model_state, read_tensors, read_torch
from ..config import ConfigError
from .base import Engine, LaunchError, check_elastic_restart


class AccelerateEngine(Engine):
    name = "accelerate"
    grad_reduction = "mean"  # DDP averages gradients over ranks

    def __init__(self, cfg):
        if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            raise ConfigError("launched with accelerate's DeepSpeed plugin but engine=accelerate; add engine=deepspeed")
        check_elastic_restart()
        # Per-worker BN (the paper): buffers are not broadcast from rank 0 at each forward; they
        # are averaged by `average_buffers` before evaluation and checkpoints instead.
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)
        self.accelerator = Accelerator(
            log_with=list(cfg.run.trackers) or None,
            project_config=ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir / "tracking")),
            kwargs_handlers=[ddp, InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.collective_timeout_s))],
            step_scheduler_with_optimizer=False,
        )
        self.precision = cfg.model.precision
        self.grad_clip_norm = cfg.optim.grad_clip_norm
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            # accelerate falls back to independent single-process runs when a CPU launch lacks
            # ACCELERATE_USE_CPU=1: each "rank" would train alone on the whole data set.
            raise LaunchError(
                f"the launcher started {launched} processes but accelerate joined {self.accelerator.num_processes}; "
                "for CPU processes set ACCELERATE_USE_CPU=1 (see accelerate_configs/README.md)"
            )

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        # accelerate's unwrap_model imports DeepSpeed, when installed, to look for its engine: seconds at
        # start-up. A model no wrapper holds (one process, not compiled) is returned as it would return it.
        wrapped = isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))
        if not (wrapped or is_compiled_module(model) or "_orig_mod" in model.__dict__):
            return model
        return self.accelerator.unwrap_model(model)

    def micro_batch(self, model, last: bool):
        """Context of one accumulation micro-batch: gradients are all-reduced only on the last."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def skip(self, model, optimizer) -> None:
        """Drop the update: weights and optimizer state stay as they are."""
        optimizer.zero_grad(set_to_none=True)

    def step(self, model, optimizer) -> bool:
        """Clip, update, clear gradients; returns whether the update was applied."""
        if self.grad_clip_norm:
            self.accelerator.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return not optimizer.step_was_skipped  # only an fp16 GradScaler skips, and the recipe has none

    def save_state(self, directory: Path, model, optimizer) -> None:
        """Model as safetensors and optimizer state, from the main process (ranks hold equal copies)."""
        if self.is_main:
            save_file(model_state(self, model), directory / "model.safetensors")
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path, model, optimizer) -> None:
        weights, moments = directory / "model.safetensors", directory / "optimizer.pt"
        state = read_tensors(weights)
        fit(weights, lambda: self.unwrap(model).load_state_dict(state), "model")
        # Loaded on the CPU: Optimizer.load_state_dict moves each state to its parameter's device.
        state = read_torch(moments)
        fit(moments, lambda: optimizer.load_state_dict(state), "optimizer")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def init_trackers(self, name: str, config: dict) -> None:
        if self.accelerator.log_with:
            self.accelerator.init_trackers(name, config=config)

    def log(self, values: dict, step: int) -> None:
        if self.accelerator.log_with:
            self.accelerator.log(values, step=step)

    def end(self) -> None:
        self.accelerator.end_training()
