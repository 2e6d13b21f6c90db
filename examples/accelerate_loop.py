"""The recipe in an accelerate loop, runnable on a CPU with generated data (kn = 32 = 2 processes x 8 x 2).

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py

Prints the LR of every update (gradual warmup 0.1 -> 0.4 over epoch 0, 0.4 in epoch 1, 0.04 in epoch 2) and
the gradient noise scale B_simple measured on it. `--out DIR` also writes each process's updates (LR, loss,
sample indices, noise scale) and the parameters after
update 3 and at the end; `--checkpoint-at U --checkpoint DIR` saves the state after update U
(`accelerator.save_state`) and goes on; `--resume DIR` continues from such a state.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader

from goyal_recipe import build_optimizer
from goyal_recipe.integrations.accelerate import AccelerateRecipe

from example_data import dataset, model, schedule  # beside this file: generated data, an MLP with BN, its LRs

GLOBAL_BATCH_SIZE, PER_DEVICE_BATCH_SIZE = 32, 8  # kn and n


def main(argv=None) -> Accelerator:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--checkpoint-at", type=int)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--noise-scale-every-updates", type=int, default=1,
                        help="measure B_simple every this many updates; 0: not at all")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    # A = kn / (n x processes): 2 with 2 processes (4 in a single process).
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    # Per-worker BN statistics (the paper): DDP must not copy rank 0's BN buffers at each forward.
    accelerator = Accelerator(gradient_accumulation_steps=GLOBAL_BATCH_SIZE // (PER_DEVICE_BATCH_SIZE * processes),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    data = dataset(dtype)
    recipe = AccelerateRecipe(accelerator, schedule(GLOBAL_BATCH_SIZE), num_samples=len(data),
                              per_device_batch_size=PER_DEVICE_BATCH_SIZE, bn_group_size=PER_DEVICE_BATCH_SIZE,
                              # B_simple from the gradients the loop already has
                              noise_scale_every_updates=args.noise_scale_every_updates or None)
    net = model(dtype)
    loader = DataLoader(data, batch_size=PER_DEVICE_BATCH_SIZE, sampler=recipe.sampler)
    net, optimizer, loader, scheduler = recipe.prepare(net, build_optimizer(net, weight_decay=1e-4), loader)
    if args.resume:
        accelerator.load_state(args.resume)

    records, loss_sum, indices = [], 0.0, []
    for epoch in recipe.epochs(loader):
        for x, y, index in loader:
            with accelerator.accumulate(net):
                loss = recipe.loss(F.cross_entropy(net(x), y, reduction="none"))
                accelerator.backward(loss)
                optimizer.step()
                if accelerator.sync_gradients:
                    update, lr = recipe.updates_done - 1, optimizer.param_groups[0]["lr"]
                scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.item()
            indices += index.tolist()
            if not accelerator.sync_gradients:
                continue
            noise = recipe.noise_scale.fields() if recipe.noise_scale else {"noise_scale": None}
            b_simple = noise["noise_scale"] or float("nan")  # None until the averages resolve it
            accelerator.print(f"epoch {epoch} update {update} lr {lr:.4f} B_simple {b_simple:.4g}")
            records.append({"update": update, "epoch": epoch, "lr": lr, "loss": loss_sum, "indices": indices,
                            "noise": noise})
            loss_sum, indices = 0.0, []
            if args.out and accelerator.is_main_process and update + 1 == 3:
                torch.save(accelerator.unwrap_model(net).state_dict(), args.out / "params_update3.pt")
            if args.checkpoint_at is not None and update + 1 == args.checkpoint_at:
                accelerator.save_state(args.checkpoint)

    if args.out:
        rank = accelerator.process_index
        (args.out / f"updates_rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if accelerator.is_main_process:
            torch.save(accelerator.unwrap_model(net).state_dict(), args.out / "params_final.pt")
    return accelerator


if __name__ == "__main__":
    main().end_training()
