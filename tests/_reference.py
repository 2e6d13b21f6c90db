"""The one-process reference of the integration tests, and what the examples' runs are checked against.

`reference_updates` gives the micro-batches that the ranks of a loop under test step over together
(goyal-train's order: one permutation per epoch, kn samples per update in blocks of the micro-batch);
`reference_parameters` steps one process over them with the recipe's update. The accelerate and DDP
examples train the same problem (`example_data`'s MLP) and write the same records (`--out DIR`): the
checks of those runs are here once.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from goyal_recipe import EpochShuffleSampler, GoyalLR, build_optimizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples and their shared example_data import as modules

import example_data  # noqa: E402


def reference_updates(num_samples: int, global_batch_size: int, per_device_batch_size: int, updates: int,
                      seed: int = 0) -> list[list[list[int]]]:
    """Each update's micro-batches of indices: update u takes the kn samples [i kn, (i + 1) kn) of its
    epoch's permutation (i = u mod the updates per epoch), in consecutive blocks of the micro-batch."""
    stream = EpochShuffleSampler(num_samples, seed=seed)
    kn, per_epoch = global_batch_size, num_samples // global_batch_size
    result = []
    for update in range(updates):
        epoch, in_epoch = divmod(update, per_epoch)
        order = stream.permutation(epoch)[in_epoch * kn:(in_epoch + 1) * kn]
        result.append(order.view(-1, per_device_batch_size).tolist())
    return result


def reference_parameters(model, optimizer, scheduler, updates, loss_of) -> list[dict[str, torch.Tensor]]:
    """One process over `updates` (from `reference_updates`): `loss_of(block)` back-propagated for each
    micro-batch, then one optimizer step and one scheduler step. The parameters after each update."""
    states = []
    for micro_batches in updates:
        for block in micro_batches:
            loss_of(block).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        states.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return states


# ---------------------------------------------------------------------------------------------------
# The accelerate and DDP examples: example_data's MLP, kn = 32 = 2 processes x 8 x 2, 3 epochs of 4 updates

KN, N, WORLD = 32, 8, 2
UPDATES_PER_EPOCH = example_data.NUM_SAMPLES // KN  # 4
TOTAL_UPDATES = 3 * UPDATES_PER_EPOCH
SCHEDULE = example_data.schedule(KN)


def read_updates(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"updates_rank{rank}.jsonl").read_text().splitlines()]


def saved_parameters(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def mlp_reference(updates: int) -> list[dict[str, torch.Tensor]]:
    """One process, float64: each micro-batch's loss summed / kn (BN over each), torch SGD with GoyalLR."""
    data = example_data.dataset(torch.float64)
    net = example_data.model(torch.float64)
    optimizer = build_optimizer(net, weight_decay=1e-4)

    def loss_of(block):
        x, y, _ = data[block]
        return F.cross_entropy(net(x), y, reduction="sum") / KN

    return reference_parameters(net, optimizer, GoyalLR(optimizer, SCHEDULE, UPDATES_PER_EPOCH),
                                reference_updates(example_data.NUM_SAMPLES, KN, N, updates), loss_of)


def check_lr_of_every_update(out: Path) -> None:
    for rank in range(WORLD):
        records = read_updates(out, rank)
        assert [r["update"] for r in records] == list(range(TOTAL_UPDATES))
        for r in records:
            assert r["lr"] == SCHEDULE.lr(r["update"] / UPDATES_PER_EPOCH)  # exactly


def check_every_sample_once_per_epoch_in_the_trainers_blocks(out: Path) -> None:
    for epoch in range(TOTAL_UPDATES // UPDATES_PER_EPOCH):
        seen = []
        for rank in range(WORLD):
            mine = [i for r in read_updates(out, rank) if r["epoch"] == epoch for i in r["indices"]]
            # The split of goyal-train's sampler: blocks of 8 dealt to the ranks in turn.
            trainer = EpochShuffleSampler(example_data.NUM_SAMPLES, WORLD, rank, 0, batch_size=N,
                                          accumulation_steps=KN // (N * WORLD))
            assert mine == trainer.rank_indices(epoch).tolist()
            seen += mine
        assert sorted(seen) == list(range(example_data.NUM_SAMPLES))


def check_parameters_equal_one_process(out: Path) -> None:
    """After update 3 and at the end, the run's parameters are the reference's, in float64."""
    expected = mlp_reference(TOTAL_UPDATES)
    for update, path in ((3, out / "params_update3.pt"), (TOTAL_UPDATES, out / "params_final.pt")):
        got = saved_parameters(path)
        assert got.keys() == expected[update - 1].keys()
        for name, value in got.items():
            torch.testing.assert_close(value, expected[update - 1][name], rtol=1e-12, atol=1e-13)
    # The naive loss would have halved every update: the reference is not trivially met.
    start = dict(example_data.model(torch.float64).named_parameters())
    assert any((expected[2][k] - start[k]).abs().max() > 1e-3 for k in start)
