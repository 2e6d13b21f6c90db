"""The recipe in a transformers `Trainer`: `GoyalTrainer`, a drop-in subclass.

What it changes in Trainer's defaults, and why:
- Optimizer: `build_optimizer` (SGD, Nesterov momentum 0.9, weight decay 1e-4 on conv and linear
  weights, none on BN gamma and beta, chosen by module type). Trainer's own filter exempts only
  LayerNorm and names containing bias/norm: a timm ResNet's BN (`bn1.weight`, `downsample.1.weight`)
  would be decayed.
- LR: `GoyalLR` with kn = per_device_train_batch_size x gradient_accumulation_steps x world size and
  the updates per epoch Trainer runs. TrainingArguments' learning_rate, lr_scheduler_type, warmup_*,
  weight_decay and optim are not used; the `schedule` and `optimizer_kwargs` arguments set them.
- Data: one `EpochShuffleSampler` stream over the whole dataset. Trainer's accelerate sharding deals its
  micro-batches to the ranks in turn (batch b to rank b % world), which is the split of
  `EpochShuffleSampler(num_replicas=world)`; a sampler that also splits by rank would split twice.
- Loss: cross-entropy from the model's logits normalised by kn (`global_batch_loss`, Remark 3), declared
  as already scaled for accumulation, so Trainer does not divide it by the accumulation steps again.
  Labels are not passed to the model: a loss the model computes itself is not used.
- Clipping: Trainer clips at max_grad_norm=1.0 by default; the paper does not clip. max_grad_norm > 0
  stops the run at its first update unless `grad_clip_norm` asks for that clipping.
- Model: zero-gamma in the last BN of each residual block and ghost BN over `bn_group_size` samples, on a
  timm model or one inside `TimmWrapperForImageClassification`.

- Noise scale (`noise_scale_every_updates`): the gradient noise scale B_simple of McCandlish et al.
  2018 from the micro-batch gradients before the all-reduce and the update's after it, no extra pass,
  added to Trainer's own training logs (`noise_scale`, `noise_grad_sq`, `noise_trace_sigma`; every
  logger and `state.log_history` see them). The averages are saved in Trainer's `scheduler.pt` with the
  schedule's update count, so a resume from a Trainer checkpoint continues them.

At the first update the recipe audit runs on what Trainer assembled (optimizer, scheduler, loader) and
a silent departure stops the run with a one-line `RecipeMismatch`. Checkpoints are Trainer's own:
`scheduler.pt` holds GoyalLR's update count, and resume repositions the data by Trainer's batch skipping
over the same per-epoch permutation (with `ignore_data_skip=True` the resumed epoch would start again at
its first sample: refused at the first update).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from ..audit import Finding, audit, refuse_silent
from ..bn import use_ghost_batchnorm, zero_init_last_bn
from ..errors import UserError
from ..first_update import FirstUpdateCheck
from ..loss import global_batch_loss
from ..lr import GoyalLR
from ..noise_scale import LoopNoiseScale
from ..optim import build_optimizer
from ..sampler import EpochShuffleSampler
from ..schedule import Schedule
from .accelerate import accelerator_loss_scale

_OPTIMIZER_DEFAULTS = {"kind": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
_FIX_SAMPLER = ("let GoyalTrainer build the sampler: one EpochShuffleSampler stream (num_replicas=1), which "
                "Trainer's own sharding splits once over the ranks")


class GoyalTrainer(Trainer):
    """`Trainer` with the paper's optimizer, LR schedule, data order, loss normalisation and BN.

    `schedule`: a `Schedule` (its global_batch_size must be this run's kn), a dict of `Schedule` fields
    (kn is filled in), or None (the paper's schedule over `args.num_train_epochs`). `optimizer_kwargs`:
    overrides of `build_optimizer`'s arguments (kind="sgd", momentum 0.9, nesterov, weight_decay 1e-4).
    `bn_group_size`: samples per BN statistics group (None keeps the model's BN). `zero_init_last`:
    gamma = 0 in each residual block's last BN. `grad_clip_norm`: clip on purpose (must equal
    `args.max_grad_norm`). `allow`: audit finding codes to report instead of refusing.
    `noise_scale_every_updates`: measure the gradient noise scale on every N-th update and log it (None: off).
    """

    # compute_loss returns each micro-batch's share of the kn mean: Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *, schedule: Schedule | dict | None = None,
                 optimizer_kwargs: dict | None = None, bn_group_size: int | None = 32, zero_init_last: bool = True,
                 grad_clip_norm: float | None = None, allow: tuple[str, ...] = (),
                 noise_scale_every_updates: int | None = None, **kwargs):
        if model is not None:
            if zero_init_last:
                zero_init_last_bn(model)
            if bn_group_size:
                use_ghost_batchnorm(model, bn_group_size)
        super().__init__(model=model, args=args, **kwargs)
        a = self.args
        if a.n_gpu > 1:
            raise UserError(f"Trainer runs DataParallel over {a.n_gpu} GPUs in one process, which splits each "
                            "micro-batch and its BN statistics; launch one process per GPU (torchrun or accelerate "
                            "launch)")
        n = a.per_device_train_batch_size
        if bn_group_size and n % bn_group_size:
            raise UserError(f"per_device_train_batch_size={n} is not a multiple of bn_group_size={bn_group_size}; "
                            "make the micro-batch a whole number of BN groups")
        self.bn_group_size = bn_group_size
        self.optimizer_kwargs = {**_OPTIMIZER_DEFAULTS, **(optimizer_kwargs or {})}
        self.grad_clip_norm = grad_clip_norm
        self.allow = tuple(allow)
        self.global_batch_size = n * a.gradient_accumulation_steps * a.world_size
        self.schedule = self._resolve_schedule(schedule)
        self.recipe_sampler: EpochShuffleSampler | None = None
        self._recipe_loss: torch.Tensor | None = None
        self._loss_checked = False
        self.noise_scale_every_updates = noise_scale_every_updates
        self.noise_scale: LoopNoiseScale | None = None
        self._resumed_noise_state: dict | None = None  # from scheduler.pt, for the meter of the next train()
        if noise_scale_every_updates is not None and self.is_deepspeed_enabled:
            raise UserError("GoyalTrainer measures the noise scale on Trainer's own DDP loop, not under DeepSpeed; "
                            "drop noise_scale_every_updates, or use integrations.deepspeed.measure_noise_scale")
        self.add_callback(_RecipeAudit(self))

    def _resolve_schedule(self, schedule) -> Schedule:
        kn = self.global_batch_size
        if schedule is None:
            return Schedule(global_batch_size=kn, epochs=self.args.num_train_epochs)
        if isinstance(schedule, Mapping):
            return Schedule(**{"global_batch_size": kn, **schedule})
        if schedule.global_batch_size != kn:
            raise UserError(
                f"the schedule's global_batch_size={schedule.global_batch_size} is not this run's kn = "
                f"per_device_train_batch_size x gradient_accumulation_steps x world size = {kn}; pass "
                "schedule=dict(...) without global_batch_size to take kn from the arguments")
        return schedule

    @property
    def updates_per_epoch(self) -> int:
        """Whole updates of kn in the training set (the sampler drops the rest, a new rest each epoch)."""
        return len(self.train_dataset) // self.global_batch_size

    def _get_train_sampler(self, train_dataset=None) -> EpochShuffleSampler:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        a = self.args
        self.recipe_sampler = EpochShuffleSampler(
            len(dataset), num_replicas=1, rank=0, seed=a.seed if a.data_seed is None else a.data_seed,
            batch_size=a.per_device_train_batch_size, accumulation_steps=a.gradient_accumulation_steps * a.world_size)
        return self.recipe_sampler

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model if model is None else model, **self.optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = _TrainerGoyalLR(self.optimizer if optimizer is None else optimizer, self.schedule,
                                                self.updates_per_epoch, trainer=self)
            self._created_lr_scheduler = True  # Trainer rebuilds a scheduler it created on the next train()
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise UserError("GoyalTrainer needs 'labels' in each batch (class indices) to compute the recipe's loss")
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0] if isinstance(outputs, tuple) \
            else outputs
        # The loss in at least float32 (bf16/fp16 logits under autocast), in float64 for a float64 model.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        per_sample = F.cross_entropy(logits, labels, reduction="none",
                                     label_smoothing=self.args.label_smoothing_factor)
        if model.training:
            loss = global_batch_loss(per_sample, self.global_batch_size, self.args.world_size)
            self._recipe_loss = loss.detach()
        else:
            loss = per_sample.mean()  # evaluation reports the plain mean
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._recipe_loss = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._loss_checked:
            self._loss_checked = True
            self._check_backward_loss(loss)
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Trainer's log, with the noise scale's averages added to the training records."""
        if self.noise_scale is not None and "loss" in logs:
            logs = {**logs, **{k: v for k, v in self.noise_scale.fields().items() if v is not None}}
        super().log(logs, *args, **kwargs)

    def _check_backward_loss(self, loss: torch.Tensor) -> None:
        """The loss Trainer back-propagated must be compute_loss's, unscaled (Trainer versions differ here)."""
        if self._recipe_loss is None:
            refuse_silent([Finding(
                "loss_unchecked", "compute_loss is not GoyalTrainer's, so the loss is not normalised by kn for "
                "Trainer's accumulation; return global_batch_loss(...) from it or remove the override", True)])
        elif not torch.allclose(loss.float(), self._recipe_loss.float(), rtol=1e-6, atol=0.0):
            ratio = float(loss) / float(self._recipe_loss) if float(self._recipe_loss) else float("nan")
            refuse_silent([Finding(
                "loss_scale", f"Trainer rescaled the recipe's loss by {ratio:.6g} before backward (this "
                "transformers version ignores loss_is_scaled_for_ga); use a transformers version that honours "
                "it", True)])


class _TrainerGoyalLR(GoyalLR):
    """GoyalLR whose state, Trainer's `scheduler.pt`, also holds the noise-scale averages: Trainer saves and
    loads the scheduler with every checkpoint through the public `state_dict` protocol, in every version, and
    loads it before `on_train_begin`, where the meter is built and takes the loaded averages."""

    def __init__(self, optimizer, schedule: Schedule, updates_per_epoch: int, *, trainer: GoyalTrainer):
        super().__init__(optimizer, schedule, updates_per_epoch)
        self.trainer = trainer

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.trainer.noise_scale is not None:
            state["noise_scale"] = self.trainer.noise_scale.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self.trainer._resumed_noise_state = state.pop("noise_scale", None)
        super().load_state_dict(state)


class _RecipeAudit(TrainerCallback):
    """At train begin (optimizer, scheduler and loader prepared, checkpoint loaded): arm the first-update audit."""

    def __init__(self, trainer: GoyalTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # Trainer and accelerate set the epoch of a sampler at most two wrappers down; after a resume's
        # skip_first_batches it sits three down (SkipBatchSampler > BatchSamplerShard > BatchSampler), where it
        # kept epoch 0's order for a resume inside a later epoch. The epoch is the one the next update belongs to.
        sampler = self.trainer.recipe_sampler
        if sampler is not None:
            sampler.set_epoch(state.global_step // self.trainer.updates_per_epoch)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        trainer = self.trainer
        kn, world = trainer.global_batch_size, args.world_size
        steps, n = args.gradient_accumulation_steps, args.per_device_train_batch_size

        def static() -> list[Finding]:
            return trainer_findings(args, trainer.grad_clip_norm) + audit(
                model=model, optimizer=optimizer, scheduler=lr_scheduler, loader=train_dataloader,
                global_batch_size=kn, world_size=world, accumulation_steps=steps, per_device_batch_size=n,
                bn_group_size=trainer.bn_group_size, fix_loader=_FIX_SAMPLER, allow=trainer.allow)

        # A resume inside an epoch: Trainer skips the epoch's first batches in the loader (its own count,
        # unless ignore_data_skip), past the sampler's offset 0, in the one stream its sharding splits.
        skipped_batches = 0 if args.ignore_data_skip else (
            state.global_step % (len(train_dataloader) // steps) * steps)
        if trainer.noise_scale_every_updates is not None:
            if trainer.noise_scale is not None:
                trainer.noise_scale.remove()
            trainer.noise_scale = LoopNoiseScale(
                model.parameters(), micro_batch_size=n, global_batch_size=kn, world_size=world,
                every_updates=trainer.noise_scale_every_updates,
                grad_scaler=trainer.accelerator.scaler).attach(optimizer)
            if trainer._resumed_noise_state is not None:
                trainer.noise_scale.load_state_dict(trainer._resumed_noise_state)
        trainer._resumed_noise_state = None
        FirstUpdateCheck(optimizer, global_batch_size=kn, world_size=world, grad_reduction="mean", static=static,
                         scheduler=lr_scheduler, sampler=trainer.recipe_sampler,
                         data_skipped=skipped_batches * n * world, allow=trainer.allow,
                         fix_loss="leave GoyalTrainer.compute_loss in place",
                         loss_scale=lambda: accelerator_loss_scale(trainer.accelerator))


def trainer_findings(args, grad_clip_norm: float | None = None) -> list[Finding]:
    """What TrainingArguments change in the paper's update."""
    findings = []
    clip, wanted = float(args.max_grad_norm or 0.0), float(grad_clip_norm or 0.0)
    if clip != wanted:
        findings.append(Finding(
            "grad_clipping",
            f"TrainingArguments(max_grad_norm={clip:g}) clips every update's gradient (Trainer's default is 1.0) "
            + ("but the paper does not clip; pass max_grad_norm=0, or GoyalTrainer(grad_clip_norm=...) to clip on "
               "purpose" if not wanted else f"but grad_clip_norm={wanted:g} was asked; make them equal"), True))
    return findings


__all__ = ["GoyalTrainer", "trainer_findings"]
