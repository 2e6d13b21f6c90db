"""The engine contract (`Engine`): what the loop asks of accelerate, DeepSpeed or the local engine.

Who owns what:
- `engines/<name>.py`: processes, devices, collectives, and the end of an update (`finish_update`:
  apply or skip, in one place per engine). The only modules importing their framework.
- `step.py`: one update's micro-batches (forward, the loss of Remark 3, backward), then `finish_update`.
- `progress.py`: the position, the running sums and when a checkpoint is due.
- `checkpoint.py`: a checkpoint directory's layout; engines write their model and optimizer state into
  it through `save_state` (plain files via `state_files.py`, or DeepSpeed's own format).
- `trainer.py`: the loop, its records and the trackers (one writer on the main process, whatever the engine).

A new engine subclasses `Engine` and implements each abstract member (`engines/local.py` is the smallest
complete one), then gets a name in `RecipeConfig.engine` and a branch in `engines.make_engine`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import UserError
from ..noise_scale import sq_norm_of_pieces

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


class UpdateOutcome(NamedTuple):
    """What `Engine.finish_update` did with an update."""

    applied: bool
    """Whether the optimizer step was taken (False: every rank dropped the update, the weights are unchanged)."""
    reduced_sums: torch.Tensor | None
    """The caller's `extra_sums`, summed over ranks by the same collective as the finiteness verdict."""
    grad_sq_norm: torch.Tensor | None
    """When asked for and the update was applied: the squared norm of the update's reduced gradient, on the device."""


class Engine(ABC):
    """What drives the loop: processes, devices, collectives, and the end of each update.

    The loop (`trainer.py`, `step.py`) uses these members and no others; a new engine subclasses this class
    and implements every abstract member (`engines/local.py` is the smallest complete one). Every engine
    runs the same maths: the recipe owns accumulation, the loss divisor, precision, the LR and the data
    order, so an engine must not divide the loss, shard the data, or step a scheduler of its own.
    """

    name: str
    """The recipe's `engine` value."""
    precision: str
    """"fp32" or "bf16" (autocast over fp32 weights)."""
    grad_reduction: str
    """How the engine combines the ranks' gradients: "mean" (DDP, DeepSpeed) or "sum"; the loss divisor follows."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """This rank's device."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """This process's rank in [0, world_size)."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """Number of data-parallel processes."""

    @property
    def is_main(self) -> bool:
        """The process that writes the run's shared files (rank 0)."""
        return self.rank == 0

    @abstractmethod
    def prepare(self, model, optimizer, plan):
        """Wrap the model (on `device`) and optimizer for this engine, for the batch chain `plan` (a BatchPlan);
        returns (model, optimizer) as the loop calls them."""

    @abstractmethod
    def unwrap(self, model):
        """The user's module inside what `prepare` returned (for state dicts and evaluation)."""

    def autocast(self):
        """bf16 autocast over fp32 weights (BN and optimizer state stay fp32), or nothing for fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_batch(self, model, last: bool):
        """Context of one accumulation micro-batch (engines that all-reduce at every backward override it)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate the loss of one micro-batch (already divided for kn; the engine must not rescale it)."""

    @abstractmethod
    def finish_update(self, model, optimizer, loss_finite: torch.Tensor, extra_sums: torch.Tensor | None = None,
                      measure_grad_norm: bool = False) -> UpdateOutcome:
        """End an update after its last backward, on every rank: apply it if every rank's loss and gradients are
        finite, else drop it (weights, optimizer state and the engine's own counters as after a skipped step,
        gradients cleared). `loss_finite` is this rank's verdict on its loss; the engine adds its own check of
        the gradients where it holds them. `extra_sums` (a 1-d tensor) is summed over ranks by the same
        collective. With `measure_grad_norm`, also return the reduced gradient's squared norm of an applied update.
        The update's one host synchronisation (reading the verdict) happens here."""

    @abstractmethod
    def save_state(self, directory: Path, model, optimizer) -> None:
        """Write the model and optimizer state into a checkpoint directory (a collective call)."""

    @abstractmethod
    def load_state(self, directory: Path, model, optimizer) -> None:
        """Restore what `save_state` wrote; a bad file is a CheckpointError naming it (a collective call)."""

    @abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, as a new tensor (the input is left as it was)."""

    @abstractmethod
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-d tensor, concatenated in rank order."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    @abstractmethod
    def end(self) -> None:
        """Release the processes' resources (the process group) at the end of the run."""

    def average_buffers(self, model) -> None:
        """Average floating-point buffers (BN running statistics of per-worker BN) over ranks."""
        if self.world_size == 1:
            return
        for buffer in self.unwrap(model).buffers():
            if buffer.is_floating_point():
                buffer.copy_(self.all_reduce_sum(buffer) / self.world_size)


def gradient_norms(parameters, device: torch.device) -> torch.Tensor:
    """The L2 norm of each parameter's .grad, stacked on the device without a host sync: one pass over the gradients
    serves both this rank's verdict (`.isfinite().all()`) and the gradient's squared norm (`sq_norm_of_pieces`)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:  # made on the device: a host tensor's blocking copy there would wait for the queued kernels
        return torch.zeros(1, device=device)
    return torch.stack(torch._foreach_norm(grads))


def finish_whole_gradient_update(engine: Engine, params: list, optimizer, loss_finite: torch.Tensor,
                                 extra_sums: torch.Tensor | None, measure_grad_norm: bool, clip) -> UpdateOutcome:
    """`finish_update` of an engine that leaves the update's whole gradient in each parameter's .grad (engine=local;
    accelerate, whose DDP reduced it during the backward): every rank applies the update (`clip()` where clipping
    is on, step, clear) or every rank drops it (clear only)."""
    norms = gradient_norms(params, engine.device)
    finite, reduced_sums = verdict_and_sums(engine, loss_finite & norms.isfinite().all(), extra_sums)
    if not finite:
        optimizer.zero_grad(set_to_none=True)  # weights and optimizer state stay as they are
        return UpdateOutcome(False, reduced_sums, None)
    if engine.grad_clip_norm:
        clip()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    applied = not getattr(optimizer, "step_was_skipped", False)  # accelerate's: only an fp16 GradScaler skips
    return UpdateOutcome(applied, reduced_sums, sq_norm_of_pieces(norms) if applied and measure_grad_norm else None)


def verdict_and_sums(engine: Engine, locally_finite: torch.Tensor, extra_sums: torch.Tensor | None):
    """One all-reduce of [ranks with a non-finite value, *extra_sums]; returns (every rank finite, reduced extras).
    The bool() is the update's one host synchronisation: every rank must take the same branch."""
    flags = (~locally_finite).double().reshape(1)
    if extra_sums is not None:
        flags = torch.cat([flags, extra_sums.double().reshape(-1).to(flags.device)])
    reduced = engine.all_reduce_sum(flags)
    return bool(reduced[0] == 0), (reduced[1:] if extra_sums is not None else None)
