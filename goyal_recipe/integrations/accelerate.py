"""The recipe in a user's own `Accelerator` loop, with accelerate's own idioms.

    accelerator = Accelerator(gradient_accumulation_steps=A)          # A = kn / (n x processes)
    recipe = AccelerateRecipe(accelerator, Schedule(global_batch_size=kn), num_samples=len(dataset),
                              per_device_batch_size=n)
    loader = DataLoader(dataset, batch_size=n, sampler=recipe.sampler)
    model, optimizer, loader, scheduler = recipe.prepare(model, build_optimizer(model), loader)
    for epoch in recipe.epochs(loader):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(recipe.loss(F.cross_entropy(model(x), y, reduction="none")))
                optimizer.step(); scheduler.step(); optimizer.zero_grad()

What each of accelerate's defaults does to the paper's update, and what the recipe does about it:
- `accelerator.backward` divides the loss by `gradient_accumulation_steps`, and DDP averages over
  the processes: `recipe.loss` weights each sample by processes x A / kn, so the update is the mean
  over kn (Remark 3) exactly. `global_batch_loss`, which already divides by kn, would be divided
  twice, and a plain `loss.backward()` would not divide by A: the first update refuses both.
- `prepare(loader)` shards the loader's batches over the processes (batch b to process b mod k).
  `recipe.sampler` is therefore one stream (one shuffle per epoch, Remark 4) that this sharding splits
  once, and process r's micro-batches are the blocks `goyal-train` gives rank r. A sampler that also
  splits (num_replicas > 1) would split twice: refused at the first update. The dataloader options keep
  those blocks: `split_batches` (a loader batch of n x k cut in k), `dispatch_batches` (the main process
  reads k batches and deals them out), `even_batches`.
- Under accelerate's DeepSpeed plugin the engine clips and accumulates by its own config: both are
  checked at the first update (a `gradient_clipping: 0` in accelerate's yaml is dropped; give DeepSpeed a
  config file).
- A prepared scheduler is stepped once per process per update and not at all between
  accumulation micro-batches; `GoyalLR` counts real optimizer updates, so either is harmless.
- `save_state()` saves the prepared scheduler but no sampler position; the recipe registers itself
  for checkpointing (`register_for_checkpointing`), so `load_state()` restores the LR position and the
  mid-epoch data position together.
- Clipping (`accelerator.clip_grad_norm_`) is no part of the paper's update: refused at the first
  update unless `allow=("grad_clipping",)`.

On a CPU, `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 loop.py` starts two
processes; `--cpu` starts one, and without ACCELERATE_USE_CPU=1 the processes do not join one group
(refused here).
"""

from __future__ import annotations

import os

from accelerate import Accelerator

from ..audit import Finding
from ..errors import UserError
from ..schedule import Schedule
from . import LoopRecipe


def accelerator_loss_scale(accelerator: Accelerator) -> float | None:
    """What `accelerator.backward` multiplies the loss by for fp16 (its GradScaler's scale; 1.0 without one), or None
    under DeepSpeed, whose fp16 scales the loss inside engine.backward, out of the accelerator's sight."""
    if accelerator.state.deepspeed_plugin is not None:
        return None
    scaler = accelerator.scaler
    return 1.0 if scaler is None else scaler.get_scale()


class AccelerateRecipe(LoopRecipe):
    """The recipe's sampler, `GoyalLR`, loss and first-update audit for an `Accelerator` loop.

    Registers itself with `accelerator.register_for_checkpointing`: `save_state`/`load_state` keep the
    LR and data position. `bn_group_size` is the BN batch the audit expects (per-device micro-batch
    with plain BN, the group with ghost BN; None: unchecked); `allow` accepts audit codes on purpose.
    `noise_scale_every_updates`: measure the gradient noise scale on every N-th update (`self.noise_scale`).
    """

    fix_loss = ("use recipe.loss(per_sample_loss): accelerator.backward already divides by "
                "gradient_accumulation_steps and DDP by the processes")
    fix_loader = "give the loader recipe.sampler (one stream) and let accelerator.prepare shard it"

    def __init__(self, accelerator: Accelerator, schedule: Schedule, *, num_samples: int, per_device_batch_size: int,
                 seed: int = 0, bn_group_size: int | None = 32, allow: tuple[str, ...] = (),
                 noise_scale_every_updates: int | None = None):
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        deepspeed = accelerator.state.deepspeed_plugin is not None
        if launched != accelerator.num_processes:
            raise UserError(f"the launcher started {launched} processes but accelerate joined "
                            f"{accelerator.num_processes}; on a CPU " + (
                                "give the Accelerator kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')] "
                                "(ACCELERATE_USE_CPU=1 would turn the DeepSpeed plugin off)" if deepspeed
                                else "set ACCELERATE_USE_CPU=1"))
        if deepspeed and noise_scale_every_updates is not None:
            raise UserError("noise_scale_every_updates is not measured under accelerate's DeepSpeed plugin "
                            "(DeepSpeed reduces the gradients inside its backward); leave it unset, or use "
                            "goyal_recipe.integrations.deepspeed.measure_noise_scale on your own deepspeed engine")
        super().__init__(schedule, num_samples=num_samples, per_device_batch_size=per_device_batch_size,
                         world_size=accelerator.num_processes, rank=accelerator.process_index,
                         split_in_sampler=False, seed=seed, bn_group_size=bn_group_size, allow=allow,
                         noise_scale_every_updates=noise_scale_every_updates)
        steps = accelerator.gradient_accumulation_steps
        if steps not in (1, self.accumulation_steps):
            raise UserError(
                f"Accelerator(gradient_accumulation_steps={steps}) but kn = {self.global_batch_size} on "
                f"{self.world_size} processes x micro-batch {self.per_device_batch_size} needs "
                f"{self.accumulation_steps}; set gradient_accumulation_steps={self.accumulation_steps}")
        self.accelerator = accelerator
        accelerator.register_for_checkpointing(self)

    @property
    def loss_divisor(self) -> int:
        """`accelerator.backward` divides the loss by the accumulation steps."""
        return self.accelerator.gradient_accumulation_steps

    def prepare(self, model, optimizer, loader, *others):
        """`accelerator.prepare(model, optimizer, loader, scheduler, *others)` with the recipe's `GoyalLR`
        as the scheduler, then `watch`. Returns (model, optimizer, loader, scheduler, *others)."""
        scheduler = self.make_scheduler(optimizer)
        prepared = self.accelerator.prepare(model, optimizer, loader, scheduler, *others)
        self.watch(prepared[0], prepared[1], prepared[2], prepared[3])
        return prepared

    def findings(self, model=None, optimizer=None, loader=None, scheduler=None, checkpointed=None,
                 grad_clip_norm: float | None = None):
        """The core audit, and under accelerate's DeepSpeed plugin the engine's own gradient clipping."""
        findings = super().findings(model, optimizer, loader, scheduler, checkpointed, grad_clip_norm)
        engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if engine is not None:
            from .deepspeed import clipping_findings

            # accelerate leaves a zero gradient_clipping of its yaml out of the DeepSpeed config, and DeepSpeed then
            # clips at its default of 1.0; a DeepSpeed config file keeps the 0.
            findings += clipping_findings(
                engine.engine, grad_clip_norm,
                where="a DeepSpeed config file (deepspeed_config_file; accelerate drops gradient_clipping: 0 from "
                      "its yaml)")
            steps = engine.engine.gradient_accumulation_steps()
            if steps != self.accumulation_steps:
                findings.append(Finding(
                    "deepspeed_accumulation",
                    f"DeepSpeed accumulates {steps} micro-batches per update (its config's "
                    "gradient_accumulation_steps, which accelerate's plugin puts over the Accelerator's) but "
                    f"kn = {self.global_batch_size} on {self.world_size} processes x micro-batch "
                    f"{self.per_device_batch_size} needs "
                    f"{self.accumulation_steps}; set gradient_accumulation_steps: {self.accumulation_steps} in the "
                    "DeepSpeed config", True))
        return findings

    def watch(self, model, optimizer, loader=None, scheduler=None, *, checkpointed=None,
              grad_clip_norm: float | None = None, on_remove=None):
        """Audit at the first update, with what accelerate's checkpoints save and its backward and clipping
        calls seen (a loss back-propagated by a plain `loss.backward()` is not divided by the accumulation)."""
        accelerator = self.accelerator
        if self.check is not None:
            self.check.remove()  # first: its on_remove undoes the instrumentation installed below
        seen = {"backward": lambda *args, **kwargs: self.check.record_backward(self.loss_divisor),
                "clip_grad_norm_": self._record_clipping, "clip_grad_value_": self._record_clipping,
                "skip_first_batches": self._record_skip}
        for name, record in seen.items():
            setattr(accelerator, name, self._watched(getattr(type(accelerator), name).__get__(accelerator), record))

        def restore():
            for name in seen:
                accelerator.__dict__.pop(name, None)

        if checkpointed is None:
            # accelerate's save_state saves the prepared schedulers and the registered objects.
            checkpointed = [*getattr(accelerator, "_schedulers", []), *getattr(accelerator, "_custom_objects", [])]
        return super().watch(model, optimizer, loader, scheduler, checkpointed=checkpointed,
                             grad_clip_norm=grad_clip_norm, on_remove=restore)

    def _grad_scaler(self):
        return self.accelerator.scaler

    def _loss_scale(self) -> float | None:
        return accelerator_loss_scale(self.accelerator)

    def _watched(self, method, record):
        def watched(*args, **kwargs):
            if self.check is not None and self.check.active:
                record(*args, **kwargs)
            return method(*args, **kwargs)
        return watched

    def _record_skip(self, dataloader, num_batches=0):
        # Each of this process's batches is one of the stream's per_device_batch_size x world_size (the sampler
        # here is one stream that the prepared loader deals out to the processes).
        self.check.record_skipped(int(num_batches) * self.per_device_batch_size * self.world_size)

    def _record_clipping(self, parameters, *args, **kwargs):
        bound = args[0] if args else kwargs.get("max_norm", kwargs.get("clip_value"))
        self.check.record_clipping(bound)
