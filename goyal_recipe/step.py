"""One optimizer update of the recipe, and the pieces it runs on; shared by the trainer and the benchmarks."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import BatchPlan, ConfigError, RecipeConfig
from .loss import global_batch_loss
from .lr import GoyalLR
from .metrics import topk_correct
from .model import build_model, compile_model
from .noise_scale import BackwardGradNorms, DeferredNoiseScale
from .optim import LAYERWISE, build_optimizer
from .progress import UpdateResult, UpdateSums

log = logging.getLogger(__name__)


def build_training(cfg: RecipeConfig, engine, plan: BatchPlan, num_classes: int, updates_per_epoch: int):
    """Model (timm, recipe init and BN mode), optimizer (weight-decay groups) and GoyalLR, prepared by the engine."""
    o = cfg.optim
    if o.optimizer in LAYERWISE and cfg.engine == "deepspeed" and cfg.deepspeed.zero_stage > 0:
        # ZeRO-1 steps the optimizer on flat shards that cut across layers: no per-layer norm to trust.
        raise ConfigError(f"optim.optimizer={o.optimizer} needs each layer's whole weight and gradient norm, but "
                          "DeepSpeed ZeRO-1 steps the optimizer on flat shards across layers; "
                          "set deepspeed.zero_stage=0")
    # On its device before the optimizer is built: the optimizer picks its fused or foreach path from it.
    model = build_model(cfg.model, num_classes, plan, engine.world_size).to(engine.device)
    optimizer = build_optimizer(model, o.optimizer, lr=o.base_lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, norm_weight_decay=o.norm_weight_decay,
                                bias_weight_decay=o.bias_weight_decay, momentum_correction=o.momentum_correction,
                                trust_coefficient=o.trust_coefficient)
    model, optimizer = engine.prepare(model, optimizer, plan)
    if cfg.model.compile:
        model = compile_model(model)
    return model, optimizer, GoyalLR(optimizer, cfg.schedule(), updates_per_epoch)


class NormStatistics:
    """The running statistics of every normalisation layer (BN, ghost BN, SyncBN), saved before an update's
    forward passes and put back when the update is skipped: a skipped update leaves the whole model, not
    only its weights, as it was. The buffers are updated in place by the forward (and by checkpoint loads),
    so the list is taken once; a save is one foreach copy (ResNet-50: 212 KB of BN statistics)."""

    def __init__(self, model: nn.Module):
        self.live = [buffer for module in model.modules() if isinstance(module, nn.modules.batchnorm._NormBase)
                     for buffer in module.buffers(recurse=False)]
        self.saved = [buffer.clone() for buffer in self.live]

    def save(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


class NoiseScaleMeter(DeferredNoiseScale):
    """The gradient noise scale measured on the update's own gradients (McCandlish et al. 2018, App. A.1):
    the small batches are the (rank, micro-batch) gradients of n images each, seen by `BackwardGradNorms`
    before any all-reduce; the big batch is the update's gradient over kn images after it. The same images
    give the same estimate whatever the split into ranks and micro-batches. The squared norms stay on the
    device until the averages are read (a step record, the epoch line, a checkpoint): no host sync."""

    def __init__(self, engine, plan: BatchPlan, model, ema_decay: float, every_updates: int = 1):
        super().__init__(plan.per_device_batch_size, plan.global_batch_size, ema_decay)
        self.engine, self.model, self.every_updates = engine, model, every_updates
        self.pairs = plan.world_size * plan.accumulation_steps
        self.params = [p for p in engine.unwrap(model).parameters() if p.requires_grad]
        self.norms = BackwardGradNorms(self.params)
        # global_batch_loss multiplies each micro-batch's per-sample mean by n x world_size / kn ("mean"
        # reduction) or n / kn ("sum"): undo it to get the squared norm of the n-image mean gradient.
        ranks = engine.world_size if engine.grad_reduction == "mean" else 1
        loss_scale = plan.per_device_batch_size * ranks / plan.global_batch_size
        self.small_factor = 1.0 / (loss_scale ** 2 * self.pairs)

    def record_sums(self, small_sq_sum: torch.Tensor, big_sq_norm) -> None:
        """An applied update's sum over its micro-batches of their loss-scaled squared gradient norms, and
        the reduced gradient's squared norm (None where the engine could not read it)."""
        if big_sq_norm is not None:
            self.record(small_sq_sum.double() * self.small_factor, big_sq_norm)

    def summary(self) -> str | None:
        """One line at an epoch's end: kn against the measured B_simple (the critical batch it approximates)."""
        t = self.tracker
        kn, b_simple = self.global_batch_size, t.b_simple
        if not t.updates:
            return None
        if b_simple is None:  # single estimates can be negative; so can short averages
            return (f"noise scale: not resolved yet (averaged |G|^2 = {t.grad_sq:.3g}, tr(Sigma) = "
                    f"{t.trace_sigma:.3g}: too few updates to average out their noise); kn = {kn}")
        # McCandlish et al.: updates to a given loss S = S_min (1 + B_noise / B), with B_simple for B_noise.
        ratio = kn / b_simple
        doubled = (1 + b_simple / (2 * kn)) / (1 + b_simple / kn)
        side = "below" if ratio < 1 else "past"
        return (f"noise scale: B_simple = {b_simple:.4g} images; kn = {kn} is {ratio:.3g}x B_simple ({side} it): "
                f"doubling kn would need {doubled:.2f}x the updates (S = S_min (1 + B_simple/kn), "
                "McCandlish et al. 2018)")


def noise_scale_meter(cfg: RecipeConfig, engine, plan: BatchPlan, model) -> NoiseScaleMeter | None:
    """The meter of `run.noise_scale`, or None (with the reason, once) where it cannot measure."""
    if not cfg.run.noise_scale:
        return None
    if plan.world_size * plan.accumulation_steps < 2:
        if engine.is_main:
            log.warning("noise scale not measured: it needs two gradients per update (world size x accumulation "
                        "steps >= 2, here 1); lower batch.per_device_batch_size or add processes to measure it")
        return None
    run = cfg.run
    return NoiseScaleMeter(engine, plan, model, run.noise_scale_ema_decay, run.noise_scale_every_updates)


class TrainStep:
    """The accumulation micro-batches of one update: forward, the loss of Remark 3, backward, then the
    engine's `finish_update`, which applies the update if every rank's loss and gradients are finite (one
    collective) or drops it; a dropped update also gets back the BN running statistics its forward passes
    moved. With `run.noise_scale`, the same collective also sums the micro-batch gradients' squared norms
    (`self.noise`, a `NoiseScaleMeter`)."""

    def __init__(self, cfg: RecipeConfig, engine, plan: BatchPlan, model, optimizer, scheduler: GoyalLR):
        self.engine, self.plan, self.model, self.optimizer, self.scheduler = engine, plan, model, optimizer, scheduler
        self.label_smoothing = cfg.optim.label_smoothing
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.preserve_format
        self.norm_statistics = NormStatistics(model)
        self.noise = noise_scale_meter(cfg, engine, plan, model)

    def noise_fields(self) -> dict:
        """`noise_scale`, `noise_grad_sq`, `noise_trace_sigma` for a step record (empty when not measured)."""
        return self.noise.fields() if self.noise is not None else {}

    def noise_summary(self) -> str | None:
        return self.noise.summary() if self.noise is not None else None

    def noise_state(self) -> dict | None:
        return self.noise.tracker.state_dict() if self.noise is not None else None

    def load_noise_state(self, state: dict | None) -> None:
        if self.noise is not None and state is not None:
            self.noise.tracker.load_state_dict(state)

    def __call__(self, batches: Iterator, poison: bool = False) -> UpdateResult:
        """One update from the next `accumulation_steps` batches of `batches`. `poison` makes this rank's loss
        NaN (the `debug.inject_nonfinite_updates` fault injection)."""
        engine, plan, device = self.engine, self.plan, self.engine.device
        sums = UpdateSums.zeros(device)
        images_used = bad_images = 0  # counted on the host from the loader's CPU tensors
        indices: list[int] = []
        self.norm_statistics.save()
        # Every N-th applied update (the same on every rank: the collective below changes shape with it).
        noise = self.noise
        if noise is not None and self.scheduler.updates_done % noise.every_updates:
            noise = None
        if self.noise is not None:
            self.noise.norms.active = noise is not None
        for micro in range(plan.accumulation_steps):
            images, labels, index, bad = next(batches)
            images = images.to(device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(device, non_blocking=True)
            with engine.micro_batch(self.model, last=micro == plan.accumulation_steps - 1):
                with engine.autocast():
                    logits = self.model(images)
                per_sample = F.cross_entropy(logits.float(), labels, reduction="none",
                                             label_smoothing=self.label_smoothing)
                if poison:
                    per_sample = per_sample * float("nan")
                engine.backward(global_batch_loss(per_sample, plan.global_batch_size, engine.world_size,
                                                  engine.grad_reduction))
            sums.add_micro_batch(per_sample.detach().sum(), topk_correct(logits.detach(), labels, ks=(1,))[0])
            images_used += labels.numel()
            bad_images += int(bad.sum())
            indices += index.tolist()
        sums.set_counts(images_used, bad_images)
        lr = self.scheduler.lr_at(self.scheduler.updates_done)
        small_sq_sum = noise.norms.take().reshape(1) if noise is not None else None
        # The update's one host synchronisation is inside finish_update: every rank reads the all-reduced verdict.
        outcome = engine.finish_update(self.model, self.optimizer, torch.isfinite(sums.loss_sum), small_sq_sum,
                                       measure_grad_norm=noise is not None)
        if outcome.applied:
            self.scheduler.step()
            if noise is not None:
                noise.record_sums(outcome.reduced_sums[0], outcome.grad_sq_norm)
        else:
            self.norm_statistics.restore()
        return UpdateResult(sums, lr, outcome.applied, indices)
