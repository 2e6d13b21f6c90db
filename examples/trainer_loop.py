"""The recipe in a transformers Trainer: 2 CPU processes, kn = 32 as 8 per process x 2 processes x 2 accumulation steps.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/trainer_loop.py
    torchrun --nproc_per_node 2 examples/trainer_loop.py          # the same, with torchrun

The model is a narrow timm ResNet-10 inside `TimmWrapperForImageClassification`, built from a timm
config (no download); the data is generated in memory. `GoyalTrainer` sets the optimizer (no decay on
BN), GoyalLR, the data order and the loss; the one TrainingArguments value the recipe needs changed is
max_grad_norm=0 (Trainer clips at 1.0 by default, the paper does not clip).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TrainingArguments

from goyal_recipe import Schedule
from goyal_recipe.errors import UserError
from goyal_recipe.integrations.transformers import GoyalTrainer


class GeneratedImages(torch.utils.data.Dataset):
    """Random images whose class shifts the mean of one colour channel; records which indices were read."""

    def __init__(self, num_samples: int = 96, num_classes: int = 4, image_size: int = 16, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator)
        self.images = torch.randn(num_samples, 3, image_size, image_size, generator=generator)
        self.images[:, 0] += self.labels.float().view(-1, 1, 1) - num_classes / 2
        self.images = self.images.to(dtype)
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


def make_schedule(global_batch_size: int, epochs: int) -> Schedule:
    """Linear scaling from 0.1 per 16 samples, gradual warmup over the first epoch, x0.1 after 1.5 epochs."""
    return Schedule(global_batch_size=global_batch_size, base_lr=0.1, base_batch_size=16, warmup_epochs=1,
                    milestones=(1.5,), epochs=epochs)


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
                         schedule=make_schedule(kn, int(args.num_train_epochs)), bn_group_size=4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/trainer_loop"))
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many updates")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--save-steps", type=int, help="save a checkpoint every this many updates")
    parser.add_argument("--record", type=Path, help="write each rank's LRs and sample indices, and the final weights")
    args = parser.parse_args(argv)

    saving = dict(save_strategy="steps", save_steps=args.save_steps) if args.save_steps else {}
    trainer = build_trainer(args.output_dir, max_steps=args.max_steps, **saving)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    if args.record:
        rank = trainer.args.process_index
        args.record.mkdir(parents=True, exist_ok=True)
        lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
        (args.record / f"rank{rank}.json").write_text(json.dumps(
            {"world_size": trainer.args.world_size, "lr": lrs, "read": trainer.train_dataset.read}))
        if trainer.is_world_process_zero():
            save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()},
                      str(args.record / "model.safetensors"))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # one line naming the cause and the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
