"""The recipe in a plain `torch.nn.parallel.DistributedDataParallel` loop under torchrun.

    dist.init_process_group("gloo")                      # or "nccl"; torchrun sets RANK and WORLD_SIZE
    recipe = DDPRecipe(Schedule(global_batch_size=kn), num_samples=len(dataset), per_device_batch_size=n)
    model = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = build_optimizer(model)
    scheduler = recipe.make_scheduler(optimizer)
    loader = DataLoader(dataset, batch_size=n, sampler=recipe.sampler)
    recipe.watch(model, optimizer, loader)
    for epoch in recipe.epochs():
        for x, y in loader:
            with recipe.accumulate(model) as update:
                recipe.loss(F.cross_entropy(model(x), y, reduction="none")).backward()
            if update:
                optimizer.step(); scheduler.step(); optimizer.zero_grad()

- DDP averages gradients over the processes: `recipe.loss` weights each sample by processes / kn,
  the mean over kn (Remark 3), with no division by the accumulation steps (DDP does none). A
  per-micro-batch `.mean()` would give A times the gradient: refused at the first update.
- `recipe.accumulate(model)` skips DDP's all-reduce (`no_sync`) on all but the last of the A
  micro-batches of an update, and says which micro-batch ends the update.
- `recipe.sampler` splits one shuffle per epoch over the ranks (Remark 4), in the blocks `goyal-train`
  gives each rank. Nothing else may split it again (torch's DistributedSampler would).
- `broadcast_buffers=False` keeps BN's running statistics per worker, as the paper does; DDP's default
  copies rank 0's at every forward (no effect on the update, only on evaluation).
- fp16: give the loop's `torch.amp.GradScaler` to the recipe, `recipe.watch(model, optimizer, loader,
  grad_scaler=scaler)`: the check at the first update reads its scale out of the gradient that reaches
  `recipe.loss`, and the noise scale out of the micro-batch gradients.
- Checkpoints: save `recipe.state_dict()` with the model and optimizer; after loading the optimizer,
  `recipe.load_state_dict(...)` restores the LR and the mid-epoch data position.
"""

from __future__ import annotations

import contextlib
import os

import torch.distributed as dist

from ..errors import UserError
from ..schedule import Schedule
from . import LoopRecipe


class DDPRecipe(LoopRecipe):
    """The recipe's sampler, `GoyalLR`, loss, accumulation and first-update audit for a DDP loop.

    The world size and rank are the process group's (one process without one). `bn_group_size` is
    the BN batch the audit expects (None: unchecked); `allow` accepts audit codes on purpose.
    `noise_scale_every_updates`: measure the gradient noise scale on every N-th update (`self.noise_scale`,
    attached by `watch`).
    """

    fix_loss = ("back-propagate recipe.loss(per_sample_loss) as it is (DDP averages over the processes; nothing "
                "divides by the accumulation); with fp16's GradScaler, give it to the recipe: "
                "recipe.watch(..., grad_scaler=scaler)")
    fix_loader = "give the loader recipe.sampler, which splits the data over the ranks once"

    def __init__(self, schedule: Schedule, *, num_samples: int, per_device_batch_size: int, seed: int = 0,
                 bn_group_size: int | None = 32, allow: tuple[str, ...] = (),
                 noise_scale_every_updates: int | None = None):
        joined = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if joined else (1, 0)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != world:
            raise UserError(f"the launcher started {launched} processes but the process group has {world}; "
                            "call torch.distributed.init_process_group() before building the recipe")
        super().__init__(schedule, num_samples=num_samples, per_device_batch_size=per_device_batch_size,
                         world_size=world, rank=rank, split_in_sampler=True, seed=seed,
                         bn_group_size=bn_group_size, allow=allow,
                         noise_scale_every_updates=noise_scale_every_updates)
        self.sync_gradients = True
        self._micro_batch = 0  # within the current update

    @contextlib.contextmanager
    def accumulate(self, model):
        """One micro-batch: gradients are all-reduced only on the update's last; yields whether it is that one."""
        self._micro_batch = self._micro_batch % self.accumulation_steps + 1
        self.sync_gradients = self._micro_batch == self.accumulation_steps
        skip_sync = not self.sync_gradients and hasattr(model, "no_sync")
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            yield self.sync_gradients

    def epochs(self, loader=None):
        """`LoopRecipe.epochs`; each epoch's first micro-batch starts an update, whatever the last epoch left."""
        for epoch in super().epochs(loader):
            self._micro_batch = 0
            yield epoch

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._micro_batch = 0  # checkpoints are taken between updates
