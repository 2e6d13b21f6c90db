"""The recipe in a transformers Trainer: 2 CPU processes, kn = 32 as 8 per process x 2 processes x 2 accumulation steps.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/trainer_loop.py
    torchrun --nproc_per_node 2 examples/trainer_loop.py          # the same, with torchrun

The model is a narrow timm ResNet-10 inside `TimmWrapperForImageClassification`, built from a timm
config (no download); the data is generated in memory. `GoyalTrainer` sets the optimizer (no decay on
BN), GoyalLR, the data order and the loss; the one TrainingArguments value the recipe needs changed is
max_grad_norm=0 (Trainer clips at 1.0 by default, the paper does not clip). The gradient noise scale
B_simple of every update is measured and logged with the loss (`noise_scale_every_updates=1`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TrainerCallback, TrainingArguments

from goyal_recipe.errors import UserError
from goyal_recipe.integrations.transformers import GoyalTrainer

from example_data import generated_images, image_schedule, save_weights, write_record  # beside this file

NOISE_KEYS = ("noise_scale", "noise_grad_sq", "noise_trace_sigma")


class GeneratedImages(torch.utils.data.Dataset):
    """`example_data.generated_images` as Trainer's dict samples; records which indices were read."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32):
        self.images, self.labels = generated_images(seed=seed, dtype=dtype)
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        self.read.append(int(index))
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def make_model(num_classes: int = 4, seed: int = 0) -> TimmWrapperForImageClassification:
    torch.manual_seed(seed)
    config = TimmWrapperConfig(architecture="resnet10t", num_labels=num_classes,
                               model_args={"channels": (8, 16, 32, 64), "stem_width": 8})
    return TimmWrapperForImageClassification(config)


def training_arguments(output_dir: str | Path, **overrides) -> TrainingArguments:
    values = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, num_train_epochs=2,
                  max_grad_norm=0.0,  # Trainer's default 1.0 clips; the paper does not
                  seed=0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                  dataloader_num_workers=0, ddp_find_unused_parameters=False)
    return TrainingArguments(output_dir=str(output_dir), **{**values, **overrides})


def build_trainer(output_dir: str | Path, *, trainer_class=GoyalTrainer, model=None, dataset=None,
                  **overrides) -> GoyalTrainer:
    args = training_arguments(output_dir, **overrides)
    kn = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return trainer_class(model=make_model() if model is None else model, args=args,
                         train_dataset=GeneratedImages() if dataset is None else dataset,
                         schedule=image_schedule(kn, int(args.num_train_epochs)), bn_group_size=4,
                         noise_scale_every_updates=1)


def logged_noise(trainer: GoyalTrainer) -> list[dict]:
    """The noise scale Trainer logged with each training loss (None where not resolved yet)."""
    return [{k: entry.get(k) for k in NOISE_KEYS} for entry in trainer.state.log_history if "loss" in entry]


class SaveWeightsAt(TrainerCallback):
    """The weights after the given updates, from the main process, as `model_update<U>.safetensors`."""

    def __init__(self, directory: Path, updates: list[int]):
        self.directory, self.updates = directory, set(updates)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and state.global_step in self.updates:
            save_weights(self.directory / f"model_update{state.global_step}.safetensors", model.state_dict())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/trainer_loop"))
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many updates")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from the newest checkpoint in --output-dir, or from the one given")
    parser.add_argument("--save-steps", type=int, help="save a checkpoint every this many updates")
    parser.add_argument("--record", type=Path,
                        help="write each rank's LRs, sample indices and noise scale, and the final weights")
    parser.add_argument("--weights-at", type=int, nargs="*", default=[],
                        help="with --record, also the weights after these updates (model_update<U>.safetensors)")
    args = parser.parse_args(argv)

    saving = dict(save_strategy="steps", save_steps=args.save_steps) if args.save_steps else {}
    trainer = build_trainer(args.output_dir, max_steps=args.max_steps, **saving)
    if args.record and args.weights_at:
        trainer.add_callback(SaveWeightsAt(args.record, args.weights_at))
    trainer.train(resume_from_checkpoint=args.resume)

    if args.record:
        lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
        write_record(args.record, trainer.args.process_index,
                     {"world_size": trainer.args.world_size, "lr": lrs, "read": trainer.train_dataset.read,
                      "noise": logged_noise(trainer)},
                     trainer.model.state_dict() if trainer.is_world_process_zero() else None)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # one line naming the cause and the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
