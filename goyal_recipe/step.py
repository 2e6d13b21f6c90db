"""One optimizer update of the recipe, and the pieces it runs on; shared by the trainer and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import BatchPlan, RecipeConfig
from .loss import global_batch_loss
from .lr import GoyalLR
from .metrics import topk_correct
from .model import build_model, compile_model
from .optim import build_optimizer


def build_training(cfg: RecipeConfig, engine, plan: BatchPlan, num_classes: int, updates_per_epoch: int):
    """Model (timm, recipe init and BN mode), optimizer (weight-decay groups) and GoyalLR, prepared by the engine."""
    # On its device before the optimizer is built: the optimizer picks its fused or foreach path from it.
    model = build_model(cfg.model, num_classes, plan, engine.world_size).to(engine.device)
    o = cfg.optim
    optimizer = build_optimizer(model, o.optimizer, lr=o.base_lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, norm_weight_decay=o.norm_weight_decay,
                                bias_weight_decay=o.bias_weight_decay, momentum_correction=o.momentum_correction)
    model, optimizer = engine.prepare(model, optimizer)
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


class TrainStep:
    """The accumulation micro-batches of one update: forward, the loss of Remark 3, backward, then the
    optimizer step if every rank's loss and gradients are finite (one collective), else a skip that also
    puts back the BN running statistics the forward passes moved."""

    def __init__(self, cfg: RecipeConfig, engine, plan: BatchPlan, model, optimizer, scheduler: GoyalLR):
        self.engine, self.plan, self.model, self.optimizer, self.scheduler = engine, plan, model, optimizer, scheduler
        self.label_smoothing = cfg.optim.label_smoothing
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.preserve_format
        self.norm_statistics = NormStatistics(model)

    def __call__(self, batches: Iterator, poison: bool = False) -> tuple[torch.Tensor, float, bool, list[int]]:
        """Returns (stats, lr, applied, indices): stats = [loss sum, top-1 correct, images, bad images]
        of this rank, the LR of the update, whether it was applied, and the sample indices used.
        `poison` makes this rank's loss NaN (fault injection)."""
        engine, plan, device = self.engine, self.plan, self.engine.device
        stats = torch.zeros(4, dtype=torch.float64, device=device)
        indices: list[int] = []
        self.norm_statistics.save()
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
            stats += torch.stack([per_sample.detach().sum().double(),
                                  topk_correct(logits.detach(), labels, ks=(1,))[0].double(),
                                  torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
                                  bad.to(device).sum().double()])
            indices += index.tolist()
        lr = self.scheduler.lr_at(self.scheduler.updates_done)
        local = torch.isfinite(stats[0]) & engine.grads_finite(self.model).to(device)
        finite = bool(engine.all_reduce_sum((~local).double().reshape(1)) == 0)
        if finite:
            # False where the engine dropped the update itself, on gradients .grad does not show
            # (DeepSpeed ZeRO-1 keeps the reduced ones in its own buffers and checks their norm).
            applied = engine.step(self.model, self.optimizer)
        else:
            engine.skip(self.model, self.optimizer)
            applied = False
        if applied:
            self.scheduler.step()
        else:
            self.norm_statistics.restore()
        return stats, lr, applied, indices
