"""The recipe in a user's own `deepspeed.initialize` loop.

Three of DeepSpeed's defaults change the paper's update without a word:
- `gradient_clipping` defaults to 1.0: every update whose gradient norm exceeds 1 is shrunk (the paper
  does not clip). `ds_config` writes 0; `check_ds_config` refuses a config that clips unasked.
- `engine.backward(loss)` divides the loss by the accumulation steps. That is right for a per-micro-batch
  mean, wrong for a loss already normalised by kn (Remark 3): `backward` here passes `scale_wrt_gas=False`.
- ZeRO-1 asserts on any optimizer outside its tested list, `torch.optim.SGD` included, unless
  `zero_allow_untested_optimizer` is set. It only shards SGD's momentum buffer and steps each shard,
  which is exact for SGD, so `ds_config` sets it.

    config = ds_config(global_batch_size=kn, per_device_batch_size=n, zero_stage=1)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model), config=config)
    scheduler = attach(engine, Schedule(global_batch_size=kn), updates_per_epoch, sampler=sampler)
    # per micro-batch:
    backward(engine, F.cross_entropy(engine(x), y, reduction="none")); engine.step()

`initialize` does those three lines in one call, and checks a config of the user's own first.
`measure_noise_scale(engine)` adds the gradient noise scale (McCandlish et al. 2018) of each update,
from the micro-batch gradients before DeepSpeed's all-reduce and the update's after it.
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

from ..audit import Finding, allowed, audit, refuse_silent
from ..errors import UserError
from ..first_update import FirstUpdateCheck
from ..loss import global_batch_loss
from ..lr import GoyalLR
from ..noise_scale import LoopNoiseScale
from ..schedule import Schedule

ZERO_STAGES = (0, 1)
_DS_DEFAULT_CLIP = 1.0  # deepspeed.runtime.constants.GRADIENT_CLIPPING_DEFAULT
_UNTESTED_REASON = ("ZeRO-1 only shards the optimizer state (SGD's momentum buffer) and steps each shard, "
                    "which is exact for SGD")
_OWNED = {"optimizer": "pass the recipe's optimizer (goyal_recipe.build_optimizer: no decay on BN) as optimizer=",
          "scheduler": "let GoyalLR set the LR of each update (DeepSpeed's WarmupLR warms up on a log curve)"}


def current_world_size() -> int:
    """Data-parallel processes: the process group's size once it exists, else the launcher's WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def ds_config(global_batch_size: int, per_device_batch_size: int, world_size: int | None = None, *,
              zero_stage: int = 0, grad_clip_norm: float | None = None, **extra) -> dict:
    """The ds_config of the recipe: the batch chain DeepSpeed asserts, no clipping, ZeRO-0 or 1.

    kn = `global_batch_size` = per_device_batch_size x world_size x gradient_accumulation_steps; the
    accumulation steps are derived and must be a whole number. `extra` adds other fields
    (communication settings, bucket sizes); fields that would change the update are refused.
    """
    world = current_world_size() if world_size is None else int(world_size)
    per_update = per_device_batch_size * world
    if per_device_batch_size < 1 or global_batch_size < 1 or global_batch_size % per_update:
        raise UserError(f"global_batch_size={global_batch_size} is not a positive multiple of per_device_batch_size x "
                         f"world size = {per_device_batch_size} x {world}; change one of them")
    if zero_stage not in ZERO_STAGES:
        raise UserError(f"zero_stage={zero_stage}: the recipe runs on ZeRO-0 or ZeRO-1 (a ResNet's parameters and "
                         "one momentum buffer fit any device; further sharding only adds traffic)")
    config = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": per_device_batch_size,
        "gradient_accumulation_steps": global_batch_size // per_update,
        # DeepSpeed clips at 1.0 unless told otherwise; the paper does not clip.
        "gradient_clipping": float(grad_clip_norm or 0.0),
        "zero_optimization": {"stage": zero_stage},
        # torch.optim.SGD is not on ZeRO's list of tested optimizers; see _UNTESTED_REASON.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    findings = [f for key in _OWNED if key in extra for f in _owned_findings({key: extra[key]})]
    refuse_silent(findings)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        if key in extra and extra[key] != config[key]:
            raise UserError(f"ds_config got {key}={extra[key]!r} but the recipe gives {config[key]!r}; "
                             "set global_batch_size, per_device_batch_size or grad_clip_norm instead")
    zero = {**extra.pop("zero_optimization", {}), "stage": zero_stage}
    return {**config, **extra, "zero_optimization": zero}


def _owned_findings(config: dict) -> list[Finding]:
    return [Finding(f"deepspeed_{key}", f"ds_config sets {key!r}, which replaces the recipe's; remove it and {fix}",
                    silent=True)
            for key, fix in _OWNED.items()
            if key in config and (not isinstance(config[key], dict) or config[key].get("enabled", True))]


def _batch_chain(config: dict, world: int) -> tuple[int | None, int | None, int | None]:
    """(train_batch_size, micro-batch, accumulation) as DeepSpeed resolves them from any two of the three."""
    def get(key):
        value = config.get(key)
        return None if value in (None, "auto") else int(value)

    kn, n, steps = get("train_batch_size"), get("train_micro_batch_size_per_gpu"), get("gradient_accumulation_steps")
    if kn is None and n is not None:
        kn = n * (steps or 1) * world
    elif n is None and kn is not None:
        n = kn // ((steps or 1) * world)
    if steps is None and kn is not None and n:
        steps = kn // (n * world)
    return kn, n, steps


def check_ds_config(config: dict, *, global_batch_size: int, world_size: int | None = None,
                    grad_clip_norm: float | None = None, optimizer: torch.optim.Optimizer | None = None
                    ) -> list[Finding]:
    """Where a user's own ds_config departs from the recipe's update, one finding each.

    Silent (DeepSpeed would run them without a word): clipping the user did not ask for (a config
    without `gradient_clipping` clips at 1.0), a batch chain whose train_batch_size is not the
    recipe's kn, DeepSpeed's own optimizer or scheduler. Not silent but unexplained: ZeRO >= 1 with
    a torch optimizer off ZeRO's tested list and no `zero_allow_untested_optimizer` (an assertion).
    """
    world = current_world_size() if world_size is None else int(world_size)
    findings = []
    try:
        clip = float(config.get("gradient_clipping", _DS_DEFAULT_CLIP))
    except (TypeError, ValueError):
        raise UserError(f"ds_config has gradient_clipping={config['gradient_clipping']!r}; DeepSpeed needs a number "
                        "(0 for the paper's update, which does not clip)") from None
    wanted = float(grad_clip_norm or 0.0)
    if clip != wanted:
        has = (f"\"gradient_clipping\": {clip:g}" if "gradient_clipping" in config
               else f"no gradient_clipping, so DeepSpeed clips at its default {_DS_DEFAULT_CLIP:g}")
        recipe = f"clips at {wanted:g}" if wanted else "does not clip (nor does the paper)"
        findings.append(Finding("grad_clipping", f"ds_config has {has} but the recipe {recipe}; set "
                                f"\"gradient_clipping\": {wanted:g}", silent=True))
    kn, n, steps = _batch_chain(config, world)
    if kn is not None and kn != global_batch_size:
        findings.append(Finding(
            "deepspeed_batch_chain",
            f"ds_config's batch chain gives train_batch_size={kn} (micro-batch {n} x {world} processes x {steps} "
            f"accumulation steps) but the recipe's kn is {global_batch_size}; set train_batch_size={global_batch_size} "
            "or use goyal_recipe.integrations.deepspeed.ds_config", silent=True))
    findings += _owned_findings(config)
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if (stage >= 1 and optimizer is not None and type(optimizer) not in ZERO_SUPPORTED_OPTIMIZERS
            and not config.get("zero_allow_untested_optimizer", False)):
        findings.append(Finding(
            "deepspeed_untested_optimizer",
            f"ZeRO-{stage} stops on {type(optimizer).__name__} unless ds_config sets "
            f"\"zero_allow_untested_optimizer\": true; set it: {_UNTESTED_REASON}", silent=False))
    return findings


def backward(engine, per_sample_loss: torch.Tensor) -> torch.Tensor:
    """Back-propagate one micro-batch so that the update's gradient is the mean over all kn samples.

    The loss is normalised by the whole kn (`global_batch_loss`, Remark 3), so DeepSpeed must not also
    divide it by the accumulation steps (`scale_wrt_gas=False`); its allreduce averages over ranks, which
    `global_batch_loss(grad_reduction="mean")` cancels. kn and the world size are the engine's own.
    """
    loss = global_batch_loss(per_sample_loss, engine.train_batch_size(), engine.dp_world_size, "mean")
    engine.backward(loss, scale_wrt_gas=False)
    return loss.detach()


def clipping_findings(engine, grad_clip_norm: float | None = None, where: str = "ds_config") -> list[Finding]:
    """The engine's gradient clipping against the recipe's (none unless `grad_clip_norm`); `where` the setting goes."""
    clip, wanted = float(engine.gradient_clipping() or 0.0), float(grad_clip_norm or 0.0)
    if clip == wanted:
        return []
    return [Finding(
        "grad_clipping",
        f"the DeepSpeed engine clips gradients at norm {clip:g} (DeepSpeed's default when ds_config has no "
        f"gradient_clipping is {_DS_DEFAULT_CLIP:g}) but the recipe "
        + (f"clips at {wanted:g}" if wanted else "does not clip (nor does the paper)")
        + f"; set \"gradient_clipping\": {wanted:g} in {where}", silent=True)]


def engine_findings(engine, grad_clip_norm: float | None = None) -> list[Finding]:
    """What the engine's resolved config changes in the update: clipping, DeepSpeed's own optimizer or scheduler."""
    findings = clipping_findings(engine, grad_clip_norm)
    if engine.client_optimizer is None:
        findings += _owned_findings({"optimizer": {}})
    if engine.client_lr_scheduler is not None:
        findings += _owned_findings({"scheduler": {}})
    return findings


def _per_parameter_groups(optimizer):
    """`optimizer`, or where ZeRO or DeepSpeed's bf16/fp16 wrapper has flattened its groups, each group's settings
    over the model parameters it was built from (the wrappers keep them, group by group, as `bit16_groups`,
    `bf16_groups` or `fp16_groups`): the audit matches weight decay to the model's BN parameters by identity."""
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = getattr(inner, "param_groups", None)
    for name in ("bit16_groups", "bf16_groups", "fp16_groups"):
        originals = getattr(optimizer, name, None)
        if isinstance(originals, list) and groups is not None and len(originals) == len(groups):
            return SimpleNamespace(param_groups=[{**group, "params": list(params)}
                                                 for group, params in zip(groups, originals)])
    return optimizer


def _watch_backward(engine, check: FirstUpdateCheck):
    """Tell `check` how each `engine.backward` call scales the loss, until the check is done."""
    original, steps = engine.backward, engine.gradient_accumulation_steps()

    def backward(loss, retain_graph=False, scale_wrt_gas=True):
        check.record_backward(steps if scale_wrt_gas else 1)
        return original(loss, retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas)

    engine.backward = backward
    return lambda: engine.__dict__.pop("backward", None)


def attach(engine, schedule: Schedule, updates_per_epoch: int, *, sampler=None, grad_clip_norm: float | None = None,
           bn_group_size: int | None = 32, allow: tuple[str, ...] = ()) -> GoyalLR:
    """GoyalLR on the engine's optimizer, and the recipe audit at the engine's first update.

    At the first update the loop stops with a one-line `RecipeMismatch` if the engine clips unasked,
    the loss was divided twice (`engine.backward(global_batch_loss(...))` without `scale_wrt_gas=False`),
    the schedule's kn is not the engine's train_batch_size, or the core audit finds another silent
    departure (BN decay, a sampler that splits the data differently, BN groups ...). `sampler` is the
    loop's `EpochShuffleSampler`; without one, the sampler of DeepSpeed's own loader (`training_data=`) is
    checked instead, so a loop that never calls its `set_epoch` is refused at the next epoch's first update.
    `allow` keeps findings the user wants (the core audit's codes).
    """
    kn, world = engine.train_batch_size(), engine.dp_world_size
    if sampler is None and engine.training_dataloader is not None:
        sampler = getattr(engine.training_dataloader, "data_sampler", None)
    steps, n = engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu()
    scheduler = GoyalLR(engine.optimizer, schedule, updates_per_epoch)

    def static() -> list[Finding]:
        return engine_findings(engine, grad_clip_norm) + audit(
            model=engine.module, optimizer=_per_parameter_groups(engine.optimizer), scheduler=scheduler,
            sampler=sampler, global_batch_size=kn, world_size=world, accumulation_steps=steps,
            per_device_batch_size=n, bn_group_size=bn_group_size,
            fix_loader="one EpochShuffleSampler(num_samples, world_size, rank, batch_size=micro-batch, "
                       "accumulation_steps=...) per rank, no DeepSpeed training_data")

    check = FirstUpdateCheck(scheduler.optimizer, accumulation_steps=steps, global_batch_size=kn, world_size=world,
                             grad_reduction="mean", static=static, scheduler=scheduler, sampler=sampler, allow=allow,
                             fix_loss="call goyal_recipe.integrations.deepspeed.backward(engine, per_sample_loss), or "
                                      "engine.backward(global_batch_loss(...), scale_wrt_gas=False)",
                             # fp16's dynamic loss scale lives inside DeepSpeed's optimizer: left undeclared.
                             loss_scale=lambda: None if engine.fp16_enabled() else 1.0)
    check.on_remove = _watch_backward(engine, check)
    return scheduler


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, schedule: Schedule,
               updates_per_epoch: int, per_device_batch_size: int | None = None, config: dict | None = None,
               zero_stage: int = 0, grad_clip_norm: float | None = None, sampler=None, bn_group_size: int | None = 32,
               allow: tuple[str, ...] = (), **initialize_kwargs):
    """`deepspeed.initialize` with the recipe's ds_config (or the user's `config`, checked first), then `attach`.

    Returns (engine, optimizer, scheduler). The recipe owns the optimizer's LR and the schedule: pass
    no `lr_scheduler` and no ds_config `optimizer`/`scheduler`. Any finding on a user's config stops
    here, before DeepSpeed starts, the untested-optimizer assertion included (with its reason).
    """
    kn, world = schedule.global_batch_size, current_world_size()
    if config is None:
        if per_device_batch_size is None:
            raise UserError("initialize() needs per_device_batch_size, or a ds_config as config=")
        config = ds_config(kn, per_device_batch_size, world, zero_stage=zero_stage, grad_clip_norm=grad_clip_norm)
    else:
        findings = check_ds_config(config, global_batch_size=kn, world_size=world, grad_clip_norm=grad_clip_norm,
                                   optimizer=optimizer)
        refuse_silent([dataclasses.replace(f, silent=True) for f in findings])
    # ZeRO-1 replaces the optimizer's parameters by flat shards: weight decay per BN layer is checked here.
    refuse_silent(allowed(audit(model=model, optimizer=optimizer, bn_group_size=None, fresh_start=False), allow))
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                      **initialize_kwargs)
    scheduler = attach(engine, schedule, updates_per_epoch, sampler=sampler, grad_clip_norm=grad_clip_norm,
                       bn_group_size=bn_group_size, allow=allow)
    return engine, ds_optimizer, scheduler


def measure_noise_scale(engine, *, every_updates: int = 1, ema_decay: float = 0.95) -> LoopNoiseScale:
    """The gradient noise scale B_simple of the engine's updates, every `every_updates`-th update, at no
    extra forward or backward: read `.fields()` to log it, save `.state_dict()` with the checkpoint.

    The micro-batch gradients are taken by hooks on the module's parameters before DeepSpeed accumulates
    and all-reduces them. The update's reduced gradient is `.grad` before the optimizer steps under
    ZeRO-0; ZeRO-1 moves it into its partitions, so its norm is the one the engine computes over them
    in `step()` (`get_global_grad_norm`), read after the boundary step. The loss must be normalised by
    kn with no division by the accumulation steps, as `backward` here does.
    """
    noise = LoopNoiseScale(engine.module.parameters(), micro_batch_size=engine.train_micro_batch_size_per_gpu(),
                           global_batch_size=engine.train_batch_size(), world_size=engine.dp_world_size,
                           every_updates=every_updates, ema_decay=ema_decay)
    if not engine.zero_optimization():
        return noise.attach(engine.optimizer)
    original = engine.step

    def step(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        result = original(*args, **kwargs)
        if boundary:
            norm = engine.get_global_grad_norm()
            noise.measure(big_sq_norm=float("nan") if norm is None else norm ** 2)  # nan: not measured
        return result

    engine.step = step
    return noise
