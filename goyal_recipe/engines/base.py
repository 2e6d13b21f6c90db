"""What every engine does the same way, on top of its own collectives."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


class LaunchError(UserError):
    """A launch that does not start the processes the run needs; the message names the command that does."""


class TrainingDiverged(UserError, FloatingPointError):
    """Updates kept failing with non-finite losses or gradients; the message names the checkpoint and the fix."""


# Set by `accelerate launch` in each of its modes; its single-process ("simple") launcher sets no WORLD_SIZE.
_ACCELERATE_LAUNCH = "ACCELERATE_DYNAMO_BACKEND"
# Set by MPI launchers, which accelerate's simple launcher uses for multi-node CPU runs (--mpirun_hostfile).
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def check_launch() -> None:
    """Refuse an `accelerate launch` that asked for several processes but started one.

    Without --multi_gpu (or a config file with distributed_type MULTI_CPU), `accelerate launch --cpu
    --num_processes 2` takes its single-process launcher: it sets MASTER_ADDR because more than one
    process was asked for, but starts one process with no WORLD_SIZE, which would train alone with
    twice the accumulation. Call before the process group is made."""
    env = os.environ
    if _ACCELERATE_LAUNCH in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env \
            and not any(key in env for key in _MPI_SIZE):
        raise LaunchError("accelerate launch started 1 process where more were asked (--num_processes without "
                          "--multi_gpu runs one); on CPUs use ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                          "--num_processes 2 (or --config_file accelerate_configs/cpu_2proc.yaml)")

_STORE_FIX = ("launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv-backend c10d, so that every attempt "
              "gets a new store (see accelerate_configs/README.md)")


def check_elastic_restart() -> None:
    """Call before the process group is made. torchrun's agent shares its rendezvous store with the workers
    (TORCHELASTIC_USE_AGENT_STORE=True), and that store outlives a restart: the restarted workers read the dead
    attempt's addresses from it, and gloo or NCCL fails to connect or hangs. Say so before, not after."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0:
        raise LaunchError(f"torchrun restarted the workers (restart {restart}) in the store of the failed attempt, "
                          f"whose stale addresses keep the process group from forming; {_STORE_FIX}, "
                          "or rerun with run.resume=auto")
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0":
        log.warning("torchrun --max-restarts with the agent's shared rendezvous store: a restart cannot form the "
                    "process group; %s", _STORE_FIX)


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
        if not grads:  # made on the device: a host tensor's blocking copy there would wait for the queued kernels
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.stack(torch._foreach_norm(grads)).isfinite().all()

    def average_buffers(self, model) -> None:
        """Average floating-point buffers (BN running statistics of per-worker BN) over ranks."""
        if self.world_size == 1:
            return
        for buffer in self.unwrap(model).buffers():
            if buffer.is_floating_point():
                buffer.copy_(self.all_reduce_sum(buffer) / self.world_size)
