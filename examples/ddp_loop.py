"""The recipe in a plain DistributedDataParallel loop, runnable on a CPU with generated data (kn = 32 = 2 x 8 x 2).

    torchrun --standalone --nproc_per_node 2 examples/ddp_loop.py

Prints the LR of every update (gradual warmup 0.1 -> 0.4 over epoch 0, 0.4 in epoch 1, 0.04 in epoch 2) and
the gradient noise scale B_simple measured on it. `--out DIR` also writes each process's updates (LR, loss,
sample indices, noise scale) and the parameters after
update 3 and at the end.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from goyal_recipe import build_optimizer
from goyal_recipe.integrations.ddp import DDPRecipe

from example_data import dataset, model, schedule  # beside this file: generated data, an MLP with BN, its LRs

GLOBAL_BATCH_SIZE, PER_DEVICE_BATCH_SIZE = 32, 8  # kn and n; accumulation = kn / (n x processes), 2 on 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")  # "nccl" on GPUs (and the model on its device)
    train(getattr(torch, args.dtype), args.out)
    dist.destroy_process_group()


def train(dtype: torch.dtype, out: Path | None = None) -> None:
    """The loop, in the process group already joined."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
    data = dataset(dtype)
    recipe = DDPRecipe(schedule(GLOBAL_BATCH_SIZE), num_samples=len(data), per_device_batch_size=PER_DEVICE_BATCH_SIZE,
                       bn_group_size=PER_DEVICE_BATCH_SIZE, noise_scale_every_updates=1)
    # Per-worker BN statistics (the paper): rank 0's BN buffers are not copied at each forward.
    net = DistributedDataParallel(model(dtype), broadcast_buffers=False)
    optimizer = build_optimizer(net, weight_decay=1e-4)
    scheduler = recipe.make_scheduler(optimizer)
    loader = DataLoader(data, batch_size=PER_DEVICE_BATCH_SIZE, sampler=recipe.sampler)
    recipe.watch(net, optimizer, loader)

    records, loss_sum, indices = [], 0.0, []
    for epoch in recipe.epochs():
        for x, y, index in loader:
            with recipe.accumulate(net) as update_now:
                loss = recipe.loss(F.cross_entropy(net(x), y, reduction="none"))
                loss.backward()
            loss_sum += loss.item()
            indices += index.tolist()
            if not update_now:
                continue
            optimizer.step()
            update, lr = recipe.updates_done - 1, optimizer.param_groups[0]["lr"]
            scheduler.step()
            optimizer.zero_grad()
            noise = recipe.noise_scale.fields()  # B_simple from the gradients the loop already has
            b_simple = noise["noise_scale"] or float("nan")  # None until the averages resolve it
            if dist.get_rank() == 0:
                print(f"epoch {epoch} update {update} lr {lr:.4f} B_simple {b_simple:.4g}", flush=True)
            records.append({"update": update, "epoch": epoch, "lr": lr, "loss": loss_sum, "indices": indices,
                            "noise": noise})
            loss_sum, indices = 0.0, []
            if out and dist.get_rank() == 0 and update + 1 == 3:
                torch.save(net.module.state_dict(), out / "params_update3.pt")

    if out:
        (out / f"updates_rank{dist.get_rank()}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if dist.get_rank() == 0:
            torch.save(net.module.state_dict(), out / "params_final.pt")


if __name__ == "__main__":
    main()
