"""What the examples train on, generated in memory and deterministic from a seed (CPU-sized).

- `dataset`, `model`, `schedule`: 128 samples of 6 features in 3 classes and a small MLP with BN
  (accelerate_loop.py, ddp_loop.py): at kn = 32, 3 epochs of 4 updates.
- `generated_images`, `image_schedule`: 96 random 16 px images whose class shifts one colour
  channel's mean (deepspeed_loop.py, trainer_loop.py, each with its framework's timm ResNet-10):
  at kn = 32, 2 epochs of 3 updates.
- `write_record`, `save_weights`: what `--record DIR` writes for the tests to compare with one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from goyal_recipe import Schedule

NUM_SAMPLES, FEATURES, CLASSES = 128, 6, 3


def dataset(dtype=torch.float32) -> TensorDataset:
    """Generated classification data; the third column is each sample's index."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
    y = (x[:, :CLASSES] + 0.5 * torch.randn(NUM_SAMPLES, CLASSES, generator=generator, dtype=torch.float64)).argmax(1)
    return TensorDataset(x.to(dtype), y, torch.arange(NUM_SAMPLES))


def model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES)).to(dtype)


def schedule(global_batch_size: int) -> Schedule:
    """eta = 0.1 per 8 samples scaled linearly to kn (0.4 at kn = 32), reached after 1 epoch; x0.1 at epoch 2 of 3."""
    return Schedule(global_batch_size=global_batch_size, base_lr=0.1, base_batch_size=8, warmup_epochs=1,
                    milestones=(2,), epochs=3)


def generated_images(num_samples: int = 96, num_classes: int = 4, image_size: int = 16, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): random images whose class shifts the mean of one colour channel."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    pixels = torch.randn(num_samples, 3, image_size, image_size, generator=generator)
    pixels[:, 0] += labels.float().view(-1, 1, 1) - num_classes / 2
    return pixels.to(dtype), labels


def image_schedule(global_batch_size: int, epochs: int) -> Schedule:
    """Linear scaling from 0.1 per 16 samples, gradual warmup over the first epoch, x0.1 after 1.5 epochs."""
    return Schedule(global_batch_size=global_batch_size, base_lr=0.1, base_batch_size=16, warmup_epochs=1,
                    milestones=(1.5,), epochs=epochs)


def write_record(directory: Path, rank: int, record: dict, state_dict: dict | None = None) -> None:
    """`rank{rank}.json` holding `record`, and `model.safetensors` where a `state_dict` is given (one rank)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank{rank}.json").write_text(json.dumps(record))
    if state_dict is not None:
        save_weights(directory / "model.safetensors", state_dict)


def save_weights(path: Path, state_dict: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(path))
