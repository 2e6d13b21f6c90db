"""What every engine does the same way, on top of its own collectives."""

from __future__ import annotations

import contextlib

import torch


class Engine:
    """Subclasses provide device, rank, world_size, unwrap, all_reduce_sum and the update itself."""

    precision: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast over fp32 weights (BN and optimizer state stay fp32), or nothing for fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_batch(self, model, last: bool):
        """Context of one accumulation micro-batch (engines that all-reduce at every backward override it)."""
        return contextlib.nullcontext()

    def grads_finite(self, model) -> torch.Tensor:
        """This rank's verdict before the update: are all gradients in .grad finite?"""
        grads = [p.grad for p in self.unwrap(model).parameters() if p.grad is not None]
        return torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads else torch.tensor(True)

    def average_buffers(self, model) -> None:
        """Average floating-point buffers (BN running statistics of per-worker BN) over ranks."""
        if self.world_size == 1:
            return
        for buffer in self.unwrap(model).buffers():
            if buffer.is_floating_point():
                buffer.copy_(self.all_reduce_sum(buffer) / self.world_size)
