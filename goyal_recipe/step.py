"""One optimizer update of the recipe, and the pieces it runs on; shared by the trainer and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .config import BatchPlan, RecipeConfig
from .loss import global_batch_loss
from .lr import GoyalLR
from .metrics import topk_correct
from .model import build_model, compile_model
from .optim import build_optimizer


def build_training(cfg: RecipeConfig, engine, plan: BatchPlan, num_classes: int, updates_per_epoch: int):
    """Model (timm, recipe init and BN mode), optimizer (weight-decay groups) and GoyalLR, prepared by the engine."""
    model = build_model(cfg.model, num_classes, plan, engine.world_size)
    o = cfg.optim
    optimizer = build_optimizer(model, o.optimizer, lr=o.base_lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, norm_weight_decay=o.norm_weight_decay,
                                bias_weight_decay=o.bias_weight_decay, momentum_correction=o.momentum_correction)
    model, optimizer = engine.prepare(model, optimizer)
    if cfg.model.compile:
        model = compile_model(model)
    return model, optimizer, GoyalLR(optimizer, cfg.schedule(), updates_per_epoch)


class TrainStep:
    """The accumulation micro-batches of one update: forward, the loss of Remark 3, backward, then the
    optimizer step if every rank's loss and gradients are finite (one collective), else a skip."""

    def __init__(self, cfg: RecipeConfig, engine, plan: BatchPlan, model, optimizer, scheduler: GoyalLR):
        self.engine, self.plan, self.model, self.optimizer, self.scheduler = engine, plan, model, optimizer, scheduler
        self.label_smoothing = cfg.optim.label_smoothing
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.preserve_format

    def __call__(self, batches: Iterator, poison: bool = False) -> tuple[torch.Tensor, float, bool, list[int]]:
        """Returns (stats, lr, applied, indices): stats = [loss sum, top-1 correct, images, bad images]
        of this rank, the LR of the update, whether it was applied, and the sample indices used.
        `poison` makes this rank's loss NaN (fault injection)."""
        engine, plan, device = self.engine, self.plan, self.engine.device
        stats = torch.zeros(4, dtype=torch.float64, device=device)
        indices: list[int] = []
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
        applied = bool(engine.all_reduce_sum((~local).double().reshape(1)) == 0)
        if applied:
            engine.step(self.model, self.optimizer)
            self.scheduler.step()
        else:
            engine.skip(self.model, self.optimizer)
        return stats, lr, applied, indices
