"""The recipe in a DeepSpeed loop: 2 CPU processes, kn = 32 as 8 per process x 2 processes x 2 accumulation steps.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/deepspeed_loop.py

On GPUs drop DS_ACCELERATOR and set --num_gpus. The data is generated in memory; the model is a
narrow timm ResNet-10 with zero-gamma and ghost BN over groups of 4 (the paper's n = 32, scaled down).
What the recipe changes in DeepSpeed's defaults: no gradient clipping (DeepSpeed clips at 1.0), no
division of the kn-normalised loss by the accumulation steps (`scale_wrt_gas=False`), the recipe's
SGD as a client optimizer (`zero_allow_untested_optimizer`, exact for SGD under ZeRO-1), GoyalLR
instead of a ds_config scheduler, and one EpochShuffleSampler per rank instead of DeepSpeed's loader.
Each update also measures the gradient noise scale B_simple (`measure_noise_scale`), printed per epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from goyal_recipe import EpochShuffleSampler, build_optimizer, use_ghost_batchnorm, zero_init_last_bn
from goyal_recipe.errors import UserError
from goyal_recipe.integrations import deepspeed as goyal_ds

from example_data import generated_images, image_schedule, save_weights, write_record  # beside this file


def make_model(num_classes: int = 4, bn_group_size: int = 4, seed: int = 0) -> torch.nn.Module:
    """A narrow timm ResNet-10 with the paper's zero-gamma init and BN statistics over groups of `bn_group_size`."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=num_classes, channels=(8, 16, 32, 64), stem_width=8)
    zero_init_last_bn(model)
    use_ghost_batchnorm(model, group_size=bn_group_size)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--per-device-batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=0, choices=goyal_ds.ZERO_STAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-updates", type=int, help="stop after this many updates")
    parser.add_argument("--record", type=Path,
                        help="write each rank's LRs, sample indices and noise scale, and the final weights")
    parser.add_argument("--weights-at", type=int, nargs="*", default=[],
                        help="with --record, also the weights after these updates (model_update<U>.safetensors)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    kn, n = args.global_batch_size, args.per_device_batch_size

    deepspeed.init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    pixels, labels = generated_images(seed=args.seed)
    dataset = TensorDataset(pixels, labels, torch.arange(len(labels)))  # with each sample's index
    accumulation_steps = kn // (n * world)
    sampler = EpochShuffleSampler(len(dataset), world, rank, seed=args.seed, batch_size=n,
                                  accumulation_steps=accumulation_steps)
    loader = DataLoader(dataset, batch_size=n, sampler=sampler)
    model = make_model(seed=args.seed)
    engine, _, scheduler = goyal_ds.initialize(
        model, build_optimizer(model, "sgd", nesterov=True, weight_decay=1e-4),  # no decay on BN
        schedule=image_schedule(kn, args.epochs), updates_per_epoch=len(dataset) // kn, per_device_batch_size=n,
        zero_stage=args.zero_stage, sampler=sampler, bn_group_size=4)
    noise = goyal_ds.measure_noise_scale(engine)  # every update, from the gradients the loop already has

    lrs, updates, indices, noise_fields = [], [], [], []
    for epoch in range(args.epochs):
        if len(lrs) == args.max_updates:
            break
        sampler.set_epoch(epoch)
        for images, labels, index in loader:
            goyal_ds.backward(engine, F.cross_entropy(engine(images), labels, reduction="none"))
            indices += index.tolist()
            last = engine.is_gradient_accumulation_boundary()
            engine.step()
            if last:  # GoyalLR set the LR of this update just before it
                lrs.append(scheduler.get_last_lr()[0])
                updates.append(indices)
                indices = []
                noise_fields.append(noise.fields())
                if args.record and rank == 0 and len(lrs) in args.weights_at:
                    save_weights(args.record / f"model_update{len(lrs)}.safetensors", engine.module.state_dict())
                if len(lrs) == args.max_updates:
                    break
        if rank == 0:
            print(f"epoch {epoch}: {scheduler.updates_done} updates, lr {lrs[-1]:.4f}, "
                  f"B_simple {noise_fields[-1]['noise_scale'] or float('nan'):.4g}", flush=True)

    if args.record:
        write_record(args.record, rank, {"world_size": world, "lr": lrs, "indices": updates, "noise": noise_fields},
                     engine.module.state_dict() if rank == 0 else None)
    torch.distributed.barrier()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # one line naming the cause and the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
