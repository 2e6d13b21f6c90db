"""The training loop: build -> (train epoch, evaluate, checkpoint) x epochs -> export.

What a module owns is written in `engines/base.py`; the loop's rules (position, sums, when to
checkpoint) are in `progress.py`, so that this file reads as the loop and nothing else.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, model_state, read_torch, save_checkpoint
from .config import BatchPlan, ConfigError, RecipeConfig, dump_config, plan_batches
from .cpu_memory import keep_freed_memory, release_freed_memory
from .data.pipeline import build_data
from .engines import make_engine
from .engines.base import TrainingDiverged
from .errors import UserError
from .metrics import EvalCounter, JsonlWriter, ThroughputMeter, format_epoch_line, format_step_line
from .progress import Progress, checkpoint_due
from .run_dir import NewPaths, preflight
from .records import EpochRecord, RunRecord, SkipRecord, StepRecord
from .schedule import format_table
from .step import TrainStep, build_training
from .trackers import Trackers

log = logging.getLogger(__name__)


def describe_run(cfg: RecipeConfig, plan: BatchPlan, num_train: int, updates_per_epoch: int) -> str:
    """The resolved table printed at start: the batch chain, BN groups and the schedule in updates."""
    rows = [
        ("devices (world size)", str(plan.world_size)),
        ("per-device micro-batch", str(plan.per_device_batch_size)),
        ("accumulation steps", str(plan.accumulation_steps)),
        ("BN group (n)", f"{plan.bn_group_size} ({cfg.model.bn}); k = {plan.bn_groups_per_update} groups per update"),
        ("training images", f"{num_train} ({updates_per_epoch} updates per epoch, "
                            f"{num_train - updates_per_epoch * plan.global_batch_size} dropped per epoch)"),
        ("optimizer", f"{cfg.optim.optimizer}, momentum {cfg.optim.momentum:g}"
                      f"{' nesterov' if cfg.optim.nesterov else ''}, weight decay {cfg.optim.weight_decay:g} "
                      f"(norm {cfg.optim.norm_weight_decay:g})"),
        ("model", f"{cfg.model.name}, zero-gamma {'on' if cfg.model.zero_init_last else 'off'}, {cfg.model.precision}"),
    ]
    return format_table(cfg.schedule().rows(updates_per_epoch) + rows)


class Trainer:
    """The loop: after each update, the progress and its records; at an epoch's end, BN averaging, evaluation
    and the epoch record; then a checkpoint where `checkpoint_due` says. The engine is whatever `cfg.engine`
    names; everything here is the same on every engine."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.engine = engine = make_engine(cfg)
        self.plan = plan = plan_batches(cfg, engine.world_size)
        if cfg.model.bn == "sync" and engine.world_size > 1 and engine.device.type != "cuda":
            raise ConfigError("model.bn=sync needs CUDA devices (torch's SyncBatchNorm); "
                              "use model.bn=ghost, the paper's per-worker statistics, on this machine")
        self.keeps_freed_memory = cfg.run.keep_freed_cpu_memory and engine.device.type == "cpu"
        if self.keeps_freed_memory:
            keep_freed_memory()
        self.run_dir = cfg.run_dir
        torch.manual_seed(cfg.run.seed)
        try:
            self.data = build_data(cfg, plan, engine)
        except FileNotFoundError as e:  # the sources name the missing path and the data.* key to set
            raise ConfigError(str(e)) from None
        self.updates_per_epoch = self.data.num_train // plan.global_batch_size
        self.model, self.optimizer, self.scheduler = build_training(
            cfg, engine, plan, cfg.model.num_classes or self.data.num_classes, self.updates_per_epoch)
        if engine.is_main:  # only once the recipe has proven buildable: a failed start leaves no run directory
            preflight(self.run_dir)
        self.train_step = TrainStep(cfg, engine, plan, self.model, self.optimizer, self.scheduler)
        self.total_updates = cfg.optim.epochs * self.updates_per_epoch
        self.stop_at = min(self.total_updates, cfg.run.max_updates or self.total_updates)
        self.progress = Progress(self.updates_per_epoch, plan.global_batch_size, engine.device)
        # The update of this run's last checkpoint, None before its first (a failure then keeps the run directory).
        self.checkpointed_at: int | None = None
        self._next_epoch_batches: Iterator | None = None  # opened at the previous epoch's end
        self._resume()
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl", enabled=engine.is_main)
        self.samples = JsonlWriter(self.run_dir / f"samples_rank{engine.rank}.jsonl", enabled=cfg.debug.log_samples)
        self.trackers = Trackers(cfg.run.trackers, self.run_dir / "tracking" / cfg.run.name, enabled=engine.is_main)
        self.meter = ThroughputMeter(total_updates=self.total_updates)
        last_rank = engine.rank == engine.world_size - 1
        self.poisoned = set(cfg.debug.inject_nonfinite_updates) if last_rank else set()

    @property
    def update(self) -> int:
        return self.progress.update

    def _resume(self) -> None:
        resume = self.cfg.run.resume
        if resume == "none":
            return
        path = latest_checkpoint(self.run_dir) if resume == "auto" else Path(resume)
        if path is None:
            return
        engine = self.engine
        state, mine = load_checkpoint(engine, path, self.model, self.optimizer)
        missing = [key for key in ("scheduler", "world_size", "progress") if key not in state]
        if missing or (mine is not None and "progress" not in mine):
            raise CheckpointError(f"{path} lacks {', '.join(missing) or 'progress'} (written by another version of "
                                  "goyal_recipe); resume with that version, or set run.resume=none")
        self.progress.load_state_dict(state["progress"])
        saved_world_size = int(state["world_size"])
        if saved_world_size == engine.world_size:
            if mine is None:
                raise CheckpointError(f"{path} lacks rank{engine.rank}.pt, written by every one of its "
                                      f"{saved_world_size} ranks; resume from another checkpoint (run.resume=PATH)")
            self.progress.add_sums(mine["progress"])
        elif engine.is_main:  # the saved ranks' running sums, summed onto rank 0: the epoch's totals stay right
            for rank in range(saved_world_size):
                self.progress.add_sums(read_torch(path / f"rank{rank}.pt")["progress"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_step.load_noise_state(state.get("noise_scale"))
        self._print(f"resumed from {path} at update {self.update}")

    def _print(self, text: str) -> None:
        if self.engine.is_main:
            tqdm.write(text)  # above the progress bar, if one is shown

    def _checkpoint(self) -> None:
        shared = {"scheduler": self.scheduler.state_dict(), "config": dump_config(self.cfg),
                  "progress": self.progress.state_dict(), "noise_scale": self.train_step.noise_state()}
        save_checkpoint(self.engine, self.run_dir, self.update, self.model, self.optimizer, shared,
                        {"progress": self.progress.sums_state_dict()}, self.cfg.run.keep_checkpoints)
        self.checkpointed_at = self.update

    def run(self) -> Path:
        cfg, engine, data = self.cfg, self.engine, self.data
        self._print(describe_run(cfg, self.plan, data.num_train, self.updates_per_epoch))
        if engine.is_main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            self.metrics.write(RunRecord(name=cfg.run.name, global_batch_size=self.plan.global_batch_size,
                                         updates_per_epoch=self.updates_per_epoch, epochs=cfg.optim.epochs,
                                         world_size=engine.world_size, resumed_at_update=self.update).as_dict())
        self.trackers.log_config(_flat(cfg.model_dump(mode="json")))
        while self.update < self.stop_at:
            self._train_epoch()
        self._finish()
        return self.run_dir

    def _train_epoch(self) -> None:
        """The updates from the current position to the epoch's end or the run's stop."""
        engine, progress, U = self.engine, self.progress, self.updates_per_epoch
        epoch, kn = progress.epoch, self.plan.global_batch_size
        opened, self._next_epoch_batches = self._next_epoch_batches or self._open_epoch(), None
        self.model.train()
        epoch_start = time.perf_counter()
        batches = self.meter.timed(opened)
        bar = tqdm(total=U, initial=progress.update_in_epoch, desc=f"epoch {epoch + 1}", unit="update", leave=False,
                   disable=not (engine.is_main and sys.stderr.isatty()))
        while True:
            result = self.train_step(batches, poison=self.update + 1 in self.poisoned)
            progress.finish_update(result)
            self.meter.step_done(kn)
            bar.update()
            self.samples.write({"epoch": epoch, "update": self.update, "indices": result.indices})
            if not result.applied:
                self._skipped(epoch)
            epoch_done = progress.at_epoch_end
            if self.update % self.cfg.run.log_every_updates == 0 or epoch_done or self.update == self.stop_at:
                self._log_step(epoch, result.lr)
            if epoch_done:
                bar.close()
                if self.update < self.stop_at:
                    # The loader workers build the next epoch's first batches while this one ends (BN averaging,
                    # evaluation, checkpoint) instead of while its first update waits for them.
                    self._next_epoch_batches = self._open_epoch()
                self._end_epoch(epoch, time.perf_counter() - epoch_start)
            if checkpoint_due(self.update, U, self.cfg.run.checkpoint_every_updates, self.stop_at):
                self._checkpoint()
            if epoch_done or self.update >= self.stop_at:
                break
        bar.close()

    def _open_epoch(self) -> Iterator:
        """The training batches from the current position to the epoch's end. With loader workers, they start
        on the first batches now: the sampler's order is fixed here, and each sample's draws are keyed by its
        (epoch, index), so when they are built changes nothing they hold."""
        progress = self.progress
        self.data.train_sampler.set_epoch(progress.epoch, start=progress.sampler_start(self.engine.world_size))
        return iter(self.data.train_loader)

    def _skipped(self, epoch: int) -> None:
        """Record a dropped update; stop after more than run.max_consecutive_nonfinite in a row."""
        in_a_row = self.progress.consecutive_skips
        first = self.update + 1 - in_a_row
        self.metrics.write(SkipRecord(update=self.update, epoch=epoch + 1).as_dict())
        self._print(f"update {self.update}: non-finite loss or gradient on some rank; update skipped "
                    f"({in_a_row} in a row)")
        if in_a_row > self.cfg.run.max_consecutive_nonfinite:
            self._checkpoint()
            raise TrainingDiverged(
                f"{in_a_row} updates in a row had a non-finite loss or gradient (from update {first}); "
                f"the weights of update {first - 1} are saved in checkpoint update_{self.update:09d}. "
                "Lower optim.base_lr, check the data, or raise run.max_consecutive_nonfinite")

    def _log_step(self, epoch: int, lr: float) -> None:
        """A step record of the window since the last one; none when every update of the window was skipped."""
        window = self.progress.window_sums.summed_over_ranks(self.engine)
        if not float(window.images) > 0:
            return
        self.progress.window_sums.zero()
        loss = window.mean_loss()
        U, meter, noise = self.updates_per_epoch, self.meter, self.train_step.noise_fields()
        self.metrics.write(StepRecord(update=self.update, epoch=self.update / U, loss=loss, lr=lr,
                                      bad_images=int(window.bad_images), images_per_s=meter.images_per_s,
                                      data_wait_s=meter.mean_data_wait_s, step_s=meter.mean_step_s, **noise).as_dict())
        noise = {f"train/{k}": v for k, v in noise.items() if v is not None}
        self.trackers.log({"train/loss": loss, "train/lr": lr, "train/images_per_s": meter.images_per_s, **noise},
                          self.update)
        self._print(format_step_line(epoch + 1, self.cfg.optim.epochs, self.update - epoch * U, U, loss, lr,
                                     meter.images_per_s, meter.mean_data_wait_s, meter.eta_s(self.update)))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1/top-5 error over every validation image once; substituted bad images are left out and counted."""
        model = self.engine.unwrap(self.model)
        model.eval()
        counter = EvalCounter(self.engine.device)
        bad_images = torch.zeros(1, dtype=torch.float64, device=self.engine.device)
        for images, labels, bad in self.data.val_loader:
            keep = bad == 0
            images = images[keep].to(self.engine.device, non_blocking=True)
            labels = labels[keep].to(self.engine.device, non_blocking=True)
            bad_images += float((~keep).sum())
            if labels.numel():
                with self.engine.autocast():
                    logits = model(images)
                counter.update(logits.float(), labels, F.cross_entropy(logits.float(), labels, reduction="none"))
        summary = counter.summary(self.engine.all_reduce_sum(counter.as_tensor()))
        summary["val_bad_images"] = int(self.engine.all_reduce_sum(bad_images))
        return summary

    def _end_epoch(self, epoch: int, epoch_s: float) -> None:
        cfg, engine = self.cfg, self.engine
        totals = self.progress.epoch_sums.summed_over_ranks(engine)
        train_stats = {"train_loss": totals.mean_loss(), "train_top1_error": totals.top1_error_pct(),
                       "train_bad_images": int(totals.bad_images), "skipped_updates": self.progress.skipped_updates,
                       "epoch_s": epoch_s}
        engine.average_buffers(self.model)
        self._check_ranks_agree()
        every = cfg.run.eval_every_epochs
        last = epoch + 1 == cfg.optim.epochs
        evaluated = self.evaluate() if every and ((epoch + 1) % every == 0 or last) else {}
        record = EpochRecord(epoch=epoch + 1, update=self.update, **train_stats, **evaluated,
                             lr=self.scheduler.lr_at(self.scheduler.updates_done - 1)).as_dict()
        self.metrics.write(record)
        self.trackers.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, float)}, self.update)
        self._print(format_epoch_line(record, cfg.optim.epochs))
        noise = self.train_step.noise_summary()
        if noise:
            self._print(noise)
        self.progress.new_epoch()  # before the checkpoint: a resume at the epoch's end starts the next one at zero
        self.meter.reset_clock()

    def _check_ranks_agree(self) -> None:
        """Data-parallel ranks must hold identical weights; a mismatch means a broken all-reduce."""
        if self.engine.world_size == 1:
            return
        checksum = torch.stack([p.detach().double().sum() for p in self.engine.unwrap(self.model).parameters()]).sum()
        sums = self.engine.gather(checksum.reshape(1))
        if not torch.all(sums == sums[0]):
            raise RuntimeError(f"ranks hold different weights after update {self.update} (checksums {sums.tolist()}); "
                               "check that every rank runs the same code, data size and recipe")

    def _finish(self) -> None:
        engine = self.engine
        self.metrics.close()
        self.samples.close()
        self.trackers.close()
        engine.barrier()
        if self.keeps_freed_memory:
            release_freed_memory()  # training's kept memory: the exports' would come on top of it
        if engine.is_main and self.update >= self.total_updates:
            save_file(model_state(engine, self.model), self.run_dir / "model.safetensors", metadata={"format": "pt"})
            self._print(f"weights: {self.run_dir / 'model.safetensors'}")
        if engine.is_main and self.cfg.run.plots:
            from .report import plot_run

            for path in plot_run(self.run_dir):
                self._print(f"plot: {path}")
        engine.end()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def train(cfg: RecipeConfig) -> Path:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main = os.environ.get("RANK", "0") == "0"  # only the main process makes the run directory
    new_paths = NewPaths(cfg.run_dir) if main else None
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.run()
    except UserError:
        if new_paths is not None and not (trainer is not None and trainer.checkpointed_at is not None):
            new_paths.remove()
        raise
