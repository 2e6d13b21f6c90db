"""engine=local: one process, in memory, on the CPU, with no launcher and no process group.

The smallest complete `Engine`: the real loop (checkpoints, resume, skips, records) in one plain process,
for debugging a recipe with a Python debugger, and for the tests of the loop's rules, which run it inside
the test process. The maths is accelerate's on one process: the same micro-batches, loss divisor,
finiteness check, clipping and optimizer step, and the same checkpoint files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..state_files import load_model_and_optimizer, save_model_and_optimizer
from .base import Engine, LaunchError, UpdateOutcome, finish_whole_gradient_update


class LocalEngine(Engine):
    name = "local"
    grad_reduction = "mean"  # one rank: the mean over ranks is the sum

    def __init__(self, cfg):
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != 1:
            raise LaunchError(f"engine=local runs one process, but the launcher started {launched}; launch one "
                              "process, or set engine=accelerate (or engine=deepspeed) for several")
        self.precision = cfg.model.precision
        self.grad_clip_norm = cfg.optim.grad_clip_norm
        self._device = torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def prepare(self, model, optimizer, plan):
        return model.to(self.device), optimizer

    def unwrap(self, model):
        return getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the module there

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish_update(self, model, optimizer, loss_finite, extra_sums=None, measure_grad_norm=False) -> UpdateOutcome:
        params = list(model.parameters())
        return finish_whole_gradient_update(self, params, optimizer, loss_finite, extra_sums, measure_grad_norm,
                                            clip=lambda: torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm))

    def save_state(self, directory: Path, model, optimizer) -> None:
        save_model_and_optimizer(self, directory, model, optimizer)

    def load_state(self, directory: Path, model, optimizer) -> None:
        load_model_and_optimizer(self, directory, model, optimizer)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1).clone()

    def barrier(self) -> None:
        pass

    def end(self) -> None:
        pass
