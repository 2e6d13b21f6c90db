"""The files of a model and its optimizer, and the errors of reading them.

Shared by `checkpoint.py` (which lays out a checkpoint directory) and the engines (which write their
model and optimizer state into it), so that neither imports the other. `.pt` files hold tensors and
plain data and are loaded with `weights_only=True`: loading them never runs code.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from: missing, incomplete, corrupt, hostile, or of another model.

    `rank_local`: found in a file only this rank reads, so this rank must report it (not only rank 0)."""

    rank_local = False


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    reason = (str(error).splitlines() or [type(error).__name__])[0][:160] or type(error).__name__
    return CheckpointError(f"{path} is corrupt or truncated ({reason}); resume from an older checkpoint "
                           "(delete this one) or set run.resume=none")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file on the CPU, or a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: resume from another one")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None


def read_torch(path: Path):
    """A `torch.save` file of tensors and plain data (`weights_only=True`), or a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: resume from another one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: loading it could run code
        raise CheckpointError(f"{path} holds pickled objects that loading would execute "
                              f"({str(e).splitlines()[0][:120]}); refused: resume only from checkpoints this "
                              "project wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise _corrupt(path, e) from None


def fit(path: Path, load, what: str) -> None:
    """Run `load()` (a load_state_dict); a mismatch is a CheckpointError naming the file."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit this {what} ({' '.join(str(e).split())[:200]}); resume with "
                              "the recipe that wrote it, or set run.resume=none") from None


def model_state(engine, model) -> dict:
    """The unwrapped model's state dict on the CPU, contiguous: what safetensors stores."""
    return {k: v.detach().contiguous().cpu() for k, v in engine.unwrap(model).state_dict().items()}


def save_model_and_optimizer(engine, directory: Path, model, optimizer) -> None:
    """`model.safetensors` and `optimizer.pt` from the main process (data-parallel ranks hold equal copies)."""
    if engine.is_main:
        save_file(model_state(engine, model), directory / MODEL_FILE)
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)


def load_model_and_optimizer(engine, directory: Path, model, optimizer) -> None:
    weights, moments = directory / MODEL_FILE, directory / OPTIMIZER_FILE
    state = read_tensors(weights)
    fit(weights, lambda: engine.unwrap(model).load_state_dict(state), "model")
    # Loaded on the CPU: Optimizer.load_state_dict moves each state to its parameter's device.
    state = read_torch(moments)
    fit(moments, lambda: optimizer.load_state_dict(state), "optimizer")
