"""Atomic checkpoints and exact resume.

A checkpoint is a directory `checkpoints/update_<N>/` holding the engine's model and optimizer
state (accelerate: `model.safetensors` and `optimizer.pt`; DeepSpeed: its own checkpoint
format), `trainer.pt`, and per rank `rank<r>.pt` (RNG and the rank's share of the epoch's running
sums) and `buffers_rank<r>.safetensors` (the rank's floating-point buffers). Per-worker BN keeps
its running statistics per rank until the epoch's end averages them (Sec. 3, "BN statistics
are computed per worker"); a checkpoint inside an epoch keeps every rank's copy, so a resumed
rank continues with its own (DeepSpeed's own checkpoint, like `model.safetensors`, holds rank 0's
module state only). `.pt` files hold tensors and plain data and are loaded with
`weights_only=True`, so loading them never runs code. A checkpoint is written under a temporary
name and renamed once complete, with a `COMPLETE` marker, so an interrupted save is never picked
by `resume=auto`. The directory must be on a file system all ranks share.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .state_files import CheckpointError, fit, model_state, read_tensors, read_torch  # noqa: F401 (public here)

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_NAME = re.compile(r"^update_(\d+)$")
_BUFFERS = re.compile(r"^buffers_rank(\d+)\.safetensors$")


def _rank_local(read, path: Path):
    try:
        return read(path)
    except CheckpointError as e:
        e.rank_local = True
        raise


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


def _float_buffers(engine, model) -> dict[str, torch.Tensor]:
    """The model's floating-point buffers by state-dict name (BN running mean and variance)."""
    return {name: buffer for name, buffer in engine.unwrap(model).named_buffers() if buffer.is_floating_point()}


def save_checkpoint(engine, run_dir: Path, update: int, model, optimizer, trainer_state: dict, rank_state: dict,
                    keep: int) -> Path:
    """Write checkpoint `update` from all ranks (a collective call), then prune to the newest `keep`.

    `trainer_state` is the same on every rank and written once; `rank_state` is this rank's own."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"update_{update:09d}"
    tmp = root / f".tmp-update_{update:09d}"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    torch.save({"rng": _rng_state(), **rank_state}, tmp / f"rank{engine.rank}.pt")
    buffers = {name: b.detach().contiguous().cpu() for name, b in _float_buffers(engine, model).items()}
    save_file(buffers, tmp / f"buffers_rank{engine.rank}.safetensors")
    engine.save_state(tmp, model, optimizer)
    if engine.is_main:
        torch.save({**trainer_state, "world_size": engine.world_size}, tmp / "trainer.pt")
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


def _load_buffers(engine, path: Path, model, saved_world_size: int) -> None:
    """This rank's own buffers when the world size is the saved one; else the mean of all saved ranks' copies
    (what the epoch's end would have averaged to), with a warning that the resume is then not exact."""
    files = sorted((p for p in path.iterdir() if _BUFFERS.match(p.name)), key=lambda p: int(_BUFFERS.match(p.name)[1]))
    if len(files) != saved_world_size:
        raise CheckpointError(f"{path} holds {len(files)} buffers_rank*.safetensors files for {saved_world_size} "
                              "ranks; the checkpoint is incomplete: resume from another one")
    live = _float_buffers(engine, model)
    if saved_world_size == engine.world_size:
        mine = path / f"buffers_rank{engine.rank}.safetensors"
        state = _rank_local(read_tensors, mine)
    else:
        if engine.is_main:
            log.warning("resuming on %d ranks from a checkpoint of %d: each rank starts from the mean of the saved "
                        "ranks' BN running statistics, so the run is no longer bit-for-bit the uninterrupted one",
                        engine.world_size, saved_world_size)
        copies = [read_tensors(f) for f in files]
        mine = path
        state = {name: sum(c[name].double() for c in copies).div(len(copies)).to(copies[0][name].dtype)
                 for name in copies[0]}
    differ = sorted(state.keys() ^ live.keys()) or [n for n, b in live.items() if b.shape != state[n].shape]
    if differ:
        raise CheckpointError(f"{mine} does not fit this model (buffers {differ[:3]} differ); resume with the recipe "
                              "that wrote it, or set run.resume=none")
    with torch.no_grad():
        for name, buffer in live.items():
            buffer.copy_(state[name])


def load_checkpoint(engine, path: Path, model, optimizer) -> tuple[dict, dict | None]:
    """Restore model, optimizer, this rank's buffers and RNG from `path` (a collective call).

    Returns (trainer state, this rank's state or None when the checkpoint has no rank of this number)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"run.resume={path} does not exist; give a checkpoint directory "
                              "(runs/<name>/checkpoints/update_<N>), auto or none")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker); pick another or resume=none")
    trainer_state = read_torch(path / "trainer.pt")
    if not isinstance(trainer_state, dict) or "world_size" not in trainer_state:
        raise CheckpointError(f"{path} has no per-rank state (written by another version of goyal_recipe); resume "
                              "with that version, or set run.resume=none")
    engine.load_state(path, model, optimizer)
    _load_buffers(engine, path, model, int(trainer_state["world_size"]))
    rank_file = path / f"rank{engine.rank}.pt"
    if not rank_file.is_file():  # resuming on more ranks than saved
        return trainer_state, None
    rank_state = _rank_local(read_torch, rank_file)
    _set_rng_state(rank_state.pop("rng"))
    return trainer_state, rank_state
