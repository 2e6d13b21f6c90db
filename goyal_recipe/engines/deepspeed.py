"""DeepSpeed as the engine, under the `deepspeed` launcher or accelerate's DeepSpeed plugin.

The run is the one accelerate gives: the same batch chain, data order, loss normalisation, LR per
update and checkpoints. What DeepSpeed could also do, the recipe does instead:
- LR: `GoyalLR` on the client optimizer. No scheduler is given to `deepspeed.initialize`: its
  engine would step it with a batch size as argument (retrying on TypeError), and DeepSpeed's
  WarmupLR warms up on a log curve by default, not the paper's linear ramp.
- Precision: `torch.autocast(bf16)` over fp32 weights, as under accelerate. DeepSpeed's bf16 mode
  casts the whole model, BN included, to bf16.
- Data: the trainer's `EpochShuffleSampler` loaders; DeepSpeed's loader never calls `set_epoch`.
- Loss: `global_batch_loss` already divides by kn, so `backward(scale_wrt_gas=False)` keeps
  DeepSpeed from dividing by the accumulation steps again; its allreduce averages over ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups as ds_groups

from ..config import BatchPlan, ConfigError, RecipeConfig, plan_batches
from ..integrations.deepspeed import ds_config as recipe_ds_config
from ..noise_scale import sq_norm_of_pieces
from ..state_files import CheckpointError
from .base import Engine, TrainingDiverged, UpdateOutcome, check_elastic_restart, gradient_norms, verdict_and_sums

# Fields of the update a user file may repeat ("auto" or the recipe's value) but not change; the recipe's key.
_RECIPE_SET = {"train_batch_size": "batch.global_batch_size", "train_micro_batch_size_per_gpu":
               "batch.per_device_batch_size", "gradient_accumulation_steps": "batch.global_batch_size / "
               "batch.per_device_batch_size", "gradient_clipping": "optim.grad_clip_norm"}
_RECIPE_OWNED = {"optimizer": "optim.*", "scheduler": "optim.* (GoyalLR)", "fp16": "model.precision",
                 "bf16": "model.precision", "amp": "model.precision"}
_TAG = "deepspeed"


def ds_config(cfg: RecipeConfig, world_size: int) -> dict:
    """The ds_config of a recipe on `world_size` processes: the batch chain as DeepSpeed asserts it, ZeRO
    stage, no clipping.

    A user file (`deepspeed.config_file`) adds fields (merged as the integration's `ds_config` merges
    its `extra`); one that contradicts the recipe is an error naming the recipe key to set instead.
    """
    return plan_ds_config(cfg, plan_batches(cfg, world_size))


def plan_ds_config(cfg: RecipeConfig, plan: BatchPlan) -> dict:
    """`ds_config` for the batch chain the trainer already planned."""
    world_size = plan.world_size
    config = recipe_ds_config(plan.global_batch_size, plan.per_device_batch_size, world_size,
                              zero_stage=cfg.deepspeed.zero_stage, grad_clip_norm=cfg.optim.grad_clip_norm)
    if not cfg.deepspeed.config_file:
        return config
    path = Path(cfg.deepspeed.config_file)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed.config_file={path} cannot be read as JSON ({e}); fix or remove it") from None
    for key, setting in _RECIPE_SET.items():
        if key in user and user[key] != "auto" and user[key] != config[key]:
            raise ConfigError(f"deepspeed.config_file sets {key}={user[key]} but the recipe gives {config[key]}; "
                              f"remove it from the file and set {setting}")
    for key, owner in _RECIPE_OWNED.items():
        if key in user and (not isinstance(user[key], dict) or user[key].get("enabled", True)):
            raise ConfigError(f"deepspeed.config_file sets {key!r}, which the recipe owns; remove it and set {owner}")
    stage = user.get("zero_optimization", {}).get("stage", config["zero_optimization"]["stage"])
    if stage != cfg.deepspeed.zero_stage:
        raise ConfigError(f"deepspeed.config_file sets zero_optimization.stage={stage} but the recipe has "
                          f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; set it in one place")
    return recipe_ds_config(plan.global_batch_size, plan.per_device_batch_size, world_size,
                            zero_stage=cfg.deepspeed.zero_stage, grad_clip_norm=cfg.optim.grad_clip_norm,
                            **{k: v for k, v in user.items() if k not in _RECIPE_SET})


def _single_process_env() -> None:
    """Let a run without a launcher form a group of one, as `python -m goyal_recipe.cli` does under accelerate."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    grad_reduction = "mean"  # DeepSpeed averages gradients over the data-parallel ranks

    def __init__(self, cfg: RecipeConfig):
        plugin_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # set by accelerate's DeepSpeed plugin
        if plugin_stage is not None and int(plugin_stage) != cfg.deepspeed.zero_stage:
            raise ConfigError(f"the accelerate config says zero_stage={plugin_stage} but the recipe has "
                              f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; make them agree")
        _single_process_env()
        check_elastic_restart()
        timeout = timedelta(seconds=cfg.run.collective_timeout_s)
        deepspeed.init_distributed(timeout=timeout)
        # DeepSpeed reduces gradients over its own copy of the world group, which it makes with
        # dist.new_group(ranks) and no timeout: torch then gives it the backend's default (30 min
        # for gloo, 10 for NCCL), and a rank waiting on a dead or stalled peer there ignores
        # run.collective_timeout_s. Made first here with the run's timeout, it is the one DeepSpeed uses.
        if ds_groups._WORLD_GROUP is None:
            ds_groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)
        self.cfg = cfg
        accelerator = get_accelerator()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._device = torch.device(accelerator.device_name(local_rank))
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self.precision = cfg.model.precision

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def prepare(self, model, optimizer, plan: BatchPlan):
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model.to(self.device), optimizer=optimizer,
                                                          config=plan_ds_config(self.cfg, plan))
        self._engine = engine
        return engine, ds_optimizer

    def unwrap(self, model):
        return getattr(model, "module", model)

    def micro_batch(self, model, last: bool):
        """The recipe owns the accumulation boundary (DeepSpeed's manual mode, set before each forward) rather
        than DeepSpeed's micro-step counter: a skipped update can then end without an optimizer step and the
        boundary of the next update is still its last micro-batch. DeepSpeed reduces gradients at the boundary."""
        self._engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        engine = self._engine
        engine.backward(loss, scale_wrt_gas=False)
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # only counts the micro-batch; the update is `step` below

    def finish_update(self, model, optimizer, loss_finite, extra_sums=None, measure_grad_norm=False) -> UpdateOutcome:
        """The accumulation boundary: DeepSpeed's step (its reduction, clipping, update) or a skip it counts.

        ZeRO-0 leaves the reduced gradients in .grad, checked here with the loss. ZeRO-1 moves them into its
        partition buffers, where only its step's own overflow check (a non-finite global gradient norm) sees
        them: there the loss is checked here and the gradients by DeepSpeed, which then skips by itself."""
        engine = self._engine
        zero = engine.zero_optimization()
        params = list(self.unwrap(model).parameters())
        norms = None if zero else gradient_norms(params, self.device)
        locally_finite = loss_finite if zero else loss_finite & norms.isfinite().all()
        finite, reduced_sums = verdict_and_sums(self, locally_finite, extra_sums)
        if not finite:
            self._skip(model, optimizer)
            return UpdateOutcome(False, reduced_sums, None)
        norm = sq_norm_of_pieces(norms) if measure_grad_norm and not zero else None  # ZeRO-0: before the step
        engine.step()
        applied = engine.was_step_applied()
        if measure_grad_norm and zero and applied:
            # ZeRO-1: the global norm its step computed for the overflow check and clipping.
            global_norm = engine.get_global_grad_norm()
            norm = None if global_norm is None else torch.as_tensor(global_norm, dtype=torch.float64) ** 2
        return UpdateOutcome(applied, reduced_sums, norm if applied else None)

    def _skip(self, model, optimizer) -> None:
        """Drop the update: weights, momentum and GoyalLR's count stay, gradients are cleared, and DeepSpeed
        counts the update as skipped (global_steps and skipped_steps, as after its own overflow skips)."""
        engine = self._engine
        if engine.zero_optimization():
            # ZeRO-1 holds the reduced gradients in its own buffers, which only its step() clears: its
            # overflow path (a non-finite gradient norm) drops the update without the client optimizer's step.
            engine.step()
            if engine.was_step_applied():
                raise TrainingDiverged(
                    "a loss was non-finite but DeepSpeed ZeRO-1 found the gradients finite and applied the update; "
                    "resume=auto continues from the last checkpoint; lower optim.base_lr or use deepspeed.zero_stage=0")
            return
        engine.zero_grad()  # ZeRO-0: the reduced gradients are the parameters' .grad
        engine.set_gradient_accumulation_boundary(False)
        engine.step()  # counts the micro-batch, updates nothing
        engine.global_steps += 1
        engine.global_samples += engine.train_batch_size()
        engine.skipped_steps += 1

    def save_state(self, directory: Path, model, optimizer) -> None:
        model.save_checkpoint(str(directory), tag=_TAG, save_latest=False)  # collective: every rank writes its part

    def load_state(self, directory: Path, model, optimizer) -> None:
        # DeepSpeed's own format is pickled: resume only from checkpoint directories you trust.
        try:
            path, _ = model.load_checkpoint(str(directory), tag=_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            raise CheckpointError(f"{directory / _TAG} cannot be loaded ({reason}); resume from another checkpoint, "
                                  "or with the recipe that wrote it") from None
        if path is None:
            raise CheckpointError(f"{directory} holds no DeepSpeed checkpoint; was it written by engine=accelerate?")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        dist.barrier()

    def end(self) -> None:
        self.barrier()  # every rank has long opened its peers' shared-memory buffers (at init)
        if self._device.type == "cpu":
            _shared_memory_buffer(self.rank).unlink(missing_ok=True)
        dist.destroy_process_group()  # no rank exits with live gloo/NCCL threads


def _shared_memory_buffer(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce makes for this rank at init and never removes (66 MB of RAM
    each, kept after the processes end); named as its shm.cpp names it."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{rank}")
