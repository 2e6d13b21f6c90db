"""Experiment trackers (`run.trackers`): one writer, owned by the trainer and used by the main process only,
whatever the engine. TensorBoard's event files go to `<run_dir>/tracking/<run name>/`."""

from __future__ import annotations

from pathlib import Path


class Trackers:
    def __init__(self, names, log_dir: Path, enabled: bool):
        self._writer = None
        if enabled and "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(log_dir))

    def log_config(self, config: dict) -> None:
        """The resolved recipe, one `key: value` line each, as the run's text summary."""
        if self._writer is not None:
            self._writer.add_text("config", "\n\n".join(f"{key}: {value}" for key, value in config.items()))

    def log(self, values: dict, step: int) -> None:
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
