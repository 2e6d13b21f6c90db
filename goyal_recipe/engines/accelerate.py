"""Hugging Face accelerate as the engine: processes, devices, DDP, collectives.

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
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, is_compiled_module

from ..config import ConfigError
from ..state_files import load_model_and_optimizer, save_model_and_optimizer
from .base import Engine, LaunchError, UpdateOutcome, check_elastic_restart, finish_whole_gradient_update


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
        # No trackers here: the trainer owns one writer for every engine (trackers.py).
        self.accelerator = Accelerator(
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

    def prepare(self, model, optimizer, plan):
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

    def finish_update(self, model, optimizer, loss_finite, extra_sums=None, measure_grad_norm=False) -> UpdateOutcome:
        """Every rank applies the update (clip, step, clear) or every rank drops it (clear only)."""
        return finish_whole_gradient_update(
            self, list(self.unwrap(model).parameters()), optimizer, loss_finite, extra_sums, measure_grad_norm,
            clip=lambda: self.accelerator.clip_grad_norm_(model.parameters(), self.grad_clip_norm))

    def save_state(self, directory: Path, model, optimizer) -> None:
        save_model_and_optimizer(self, directory, model, optimizer)

    def load_state(self, directory: Path, model, optimizer) -> None:
        load_model_and_optimizer(self, directory, model, optimizer)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def end(self) -> None:
        self.accelerator.end_training()
