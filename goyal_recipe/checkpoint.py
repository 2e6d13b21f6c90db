"""Atomic checkpoints and exact resume.

A checkpoint is a directory `checkpoints/update_<N>/` holding the engine's model and optimizer
state (accelerate: `model.safetensors` and `optimizer.pt`; DeepSpeed: its own checkpoint
format), `trainer.pt` and one `rng_rank<r>.pt` per rank (tensors and plain data, loaded with
`weights_only=True`, so loading them never runs code). It is written under a temporary name and
renamed once complete, with a `COMPLETE` marker, so an interrupted save is never picked by
`resume=auto`. The directory must be on a file system all ranks share.
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import shutil
from pathlib import Path

import torch

from .config import ConfigError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_NAME = re.compile(r"^update_(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; incomplete ones are skipped with a warning."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for path in root.glob("update_*"):
        if not _NAME.match(path.name):
            continue
        if (path / MARKER).is_file():
            found.append(path)
        else:
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", path, MARKER)
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(engine, model) -> dict:
    """The unwrapped model's state dict on the CPU, contiguous: what safetensors stores."""
    return {k: v.detach().contiguous().cpu() for k, v in engine.unwrap(model).state_dict().items()}


def save_checkpoint(engine, run_dir: Path, update: int, model, optimizer, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `update` from all ranks (a collective call), then prune to the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"update_{update:09d}"
    tmp = root / f".tmp-update_{update:09d}"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{engine.rank}.pt")
    engine.save_state(tmp, model, optimizer)
    if engine.is_main:
        torch.save(trainer_state, tmp / "trainer.pt")
    engine.barrier()
    if engine.is_main:
        (tmp / MARKER).write_text(f"{update}\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def load_checkpoint(engine, path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; return the trainer state (a collective call)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker); pick another or resume=none")
    try:
        engine.load_state(path, model, optimizer)
        rng = path / f"rng_rank{engine.rank}.pt"
        if rng.is_file():  # absent when resuming on more ranks than saved
            _set_rng_state(torch.load(rng, weights_only=True))
        return torch.load(path / "trainer.pt", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: loading it could run code
        raise ConfigError(f"{path} holds pickled objects that loading would execute ({str(e).splitlines()[0][:120]}); "
                          "refused: resume only from checkpoints this project wrote") from None
