"""The recipe in a user's accelerate loop, under `accelerate launch` with 2 CPU processes and accumulation 2.

The example `examples/accelerate_loop.py` runs in float64: the LR of every update on both ranks is the
schedule's, each epoch uses every sample once in the blocks `goyal-train` gives each rank, and the
parameters after 3 updates (and at the end) are those of one process stepping over the same
micro-batches, computed here. A run resumed from `save_state` mid-epoch ends with the losses and
parameters of the uninterrupted one. Run as a script under the launcher, this module makes the
mistakes of the issue one by one in a user's loop (each stops at the first update with the audit's
line), then runs that resume in the same processes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO / "examples"))

import accelerate_loop as example  # noqa: E402

from goyal_recipe import EpochShuffleSampler, GoyalLR, build_optimizer  # noqa: E402
from goyal_recipe.errors import RecipeMismatch  # noqa: E402

WORLD, ACCUMULATION = 2, 2
UPDATES_PER_EPOCH = example.NUM_SAMPLES // example.GLOBAL_BATCH_SIZE  # 4
TOTAL_UPDATES = 3 * UPDATES_PER_EPOCH
CHECKPOINT_AT = 6  # mid-epoch 1


def launch(args, tmp_path, script):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1",
           str(script), *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_updates(out, rank):
    return [json.loads(line) for line in (out / f"updates_rank{rank}.jsonl").read_text().splitlines()]


def parameters(path):
    state = torch.load(path, weights_only=True)
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def reference(updates):
    """One process, float64: update u takes the epoch permutation's blocks [4u, 4u+4) of 8 samples as its
    micro-batches (BN over each), loss summed / kn, torch SGD with GoyalLR."""
    data = example.dataset(torch.float64)
    net = example.model(torch.float64)
    optimizer = build_optimizer(net, weight_decay=1e-4)
    scheduler = GoyalLR(optimizer, example.schedule(), UPDATES_PER_EPOCH)
    stream = EpochShuffleSampler(example.NUM_SAMPLES, seed=0)
    states = {}
    for update in range(updates):
        epoch, in_epoch = divmod(update, UPDATES_PER_EPOCH)
        kn = example.GLOBAL_BATCH_SIZE
        order = stream.permutation(epoch)[in_epoch * kn:(in_epoch + 1) * kn]
        for block in order.view(-1, example.PER_DEVICE_BATCH_SIZE):
            x, y, _ = data[block]
            (F.cross_entropy(net(x), y, reduction="sum") / kn).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        states[update + 1] = {k: v.detach().clone() for k, v in net.named_parameters()}
    return states


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run (checkpointing after update 6 on the way); then, in one launch, the user's
    mistakes and the example resumed from that checkpoint."""
    tmp = tmp_path_factory.mktemp("accelerate")
    full, resumed, checkpoint = tmp / "full", tmp / "resumed", tmp / "checkpoint"
    proc = launch(["--dtype", "float64", "--out", str(full), "--checkpoint-at", str(CHECKPOINT_AT),
                   "--checkpoint", str(checkpoint)], tmp, REPO / "examples" / "accelerate_loop.py")
    launch(["--mistakes", str(tmp), "--dtype", "float64", "--out", str(resumed), "--resume", str(checkpoint)], tmp,
           Path(__file__))
    return full, resumed, proc.stdout, tmp


def test_lr_of_every_update_on_every_rank_is_the_schedule(runs):
    full, _, stdout, _ = runs
    schedule = example.schedule()
    for rank in range(WORLD):
        records = read_updates(full, rank)
        assert [r["update"] for r in records] == list(range(TOTAL_UPDATES))
        for r in records:
            assert r["lr"] == schedule.lr(r["update"] / UPDATES_PER_EPOCH)  # exactly
    assert "update 4 lr 0.4000" in stdout and "update 8 lr 0.0400" in stdout


def test_every_sample_once_per_epoch_in_the_trainers_blocks(runs):
    full, _, _, _ = runs
    for epoch in range(3):
        seen = []
        for rank in range(WORLD):
            mine = [i for r in read_updates(full, rank) if r["epoch"] == epoch for i in r["indices"]]
            # The split of goyal-train's sampler: blocks of 8 dealt to the ranks in turn.
            trainer = EpochShuffleSampler(example.NUM_SAMPLES, WORLD, rank, 0, batch_size=8, accumulation_steps=2)
            assert mine == trainer.rank_indices(epoch).tolist()
            seen += mine
        assert sorted(seen) == list(range(example.NUM_SAMPLES))


def test_parameters_equal_one_process_over_the_same_micro_batches(runs):
    full, _, _, _ = runs
    expected = reference(TOTAL_UPDATES)
    for update, path in ((3, full / "params_update3.pt"), (TOTAL_UPDATES, full / "params_final.pt")):
        got = parameters(path)
        assert got.keys() == expected[update].keys()
        for name, value in got.items():
            torch.testing.assert_close(value, expected[update][name], rtol=1e-12, atol=1e-13)
    # The naive loss would have halved every update: the reference is not trivially met.
    start = dict(example.model(torch.float64).named_parameters())
    assert any((expected[3][k] - start[k]).abs().max() > 1e-3 for k in start)


def test_save_state_mid_epoch_then_load_state_continues_exactly(runs):
    full, resumed, _, _ = runs
    for rank in range(WORLD):
        after = [r for r in read_updates(full, rank) if r["update"] >= CHECKPOINT_AT]
        again = read_updates(resumed, rank)
        assert [r["update"] for r in again] == list(range(CHECKPOINT_AT, TOTAL_UPDATES))
        assert [(r["lr"], r["loss"], r["indices"]) for r in again] == [(r["lr"], r["loss"], r["indices"]) for r in after]
    uninterrupted, continued = parameters(full / "params_final.pt"), parameters(resumed / "params_final.pt")
    assert all(torch.equal(uninterrupted[k], continued[k]) for k in uninterrupted)


# ---------------------------------------------------------------------------------------------------
# The mistakes, made in a user's loop (run under the launcher by the `runs` fixture)

MISTAKES = {
    "naive_loss": "loss_divided_twice",  # accumulate() + global_batch_loss: accelerate divides by A again
    "sampler_splits_too": "data_split_twice",  # a rank-splitting sampler in a prepared loader
    "plain_backward": "loss_scale",  # recipe.loss through loss.backward(): nothing divides by A
    "clipping": "grad_clipping",  # accelerator.clip_grad_norm_
    "clipping_by_value": "grad_clipping",  # accelerator.clip_grad_value_, its bound given by keyword
    "bn_decay": "norm_weight_decay",  # torch.optim.SGD(model.parameters(), weight_decay=...)
    "own_sampler": "sampler_not_checkpointed",  # save_state would keep the LR, not this sampler's position
    "loader_not_prepared": "data_not_split",
}


def _mistake(name):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from goyal_recipe import global_batch_loss
    from goyal_recipe.integrations.accelerate import AccelerateRecipe

    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION,
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    data = example.dataset(torch.float64)
    net = example.model(torch.float64)
    recipe = AccelerateRecipe(accelerator, example.schedule(), num_samples=len(data), per_device_batch_size=8,
                              bn_group_size=8)
    sampler = recipe.sampler
    if name == "sampler_splits_too":
        sampler = EpochShuffleSampler(len(data), WORLD, accelerator.process_index, batch_size=8, accumulation_steps=2)
    if name == "own_sampler":
        sampler = EpochShuffleSampler(len(data), batch_size=8, accumulation_steps=4)
    if name == "bn_decay":
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = build_optimizer(net, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    if name == "loader_not_prepared":
        net, optimizer = accelerator.prepare(net, optimizer)
        recipe.watch(net, optimizer, loader)
    else:
        net, optimizer, loader, scheduler = recipe.prepare(net, optimizer, loader)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    start = recipe.updates_done
    error = None
    try:
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for x, y, _ in loader:
                with accelerator.accumulate(net):
                    per_sample = F.cross_entropy(net(x), y, reduction="none")
                    if name == "naive_loss":
                        loss = global_batch_loss(per_sample, recipe.global_batch_size, accelerator.num_processes)
                    else:
                        loss = recipe.loss(per_sample)
                    loss.backward() if name == "plain_backward" else accelerator.backward(loss)
                    if name == "clipping" and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(net.parameters(), 1.0)
                    if name == "clipping_by_value" and accelerator.sync_gradients:
                        accelerator.clip_grad_value_(net.parameters(), clip_value=0.5)
                    optimizer.step()
                    optimizer.zero_grad()
    except RecipeMismatch as exc:
        error = str(exc)
    unchanged = all(torch.equal(before[k], v) for k, v in net.named_parameters())
    return {"name": name, "error": error, "updates": recipe.updates_done - start, "unchanged": unchanged}


def _run_mistakes(out: Path) -> None:
    results = []
    for name in MISTAKES:
        results.append(_mistake(name))
    rank = int(os.environ["RANK"])
    (out / f"mistakes_rank{rank}.json").write_text(json.dumps(results))


def test_mistakes_stop_at_first_update(runs):
    out = runs[3]
    for rank in range(WORLD):
        results = {r["name"]: r for r in json.loads((out / f"mistakes_rank{rank}.json").read_text())}
        assert results.keys() == MISTAKES.keys()
        for name, code in MISTAKES.items():
            r = results[name]
            assert r["error"] is not None and r["error"].startswith(f"{code}: "), (name, r)
            assert "\n" not in r["error"]
            assert r["updates"] == 0 and r["unchanged"], (name, r)
    # recipe.loss weights each sample A / kn for accelerator.backward's division by A = 2.
    assert "each sample's gradient carries 2 x 1/kn" in results["plain_backward"]["error"]


if __name__ == "__main__":  # --mistakes DIR, then the example's own arguments (it ends the process group)
    flag = sys.argv.index("--mistakes")
    _run_mistakes(Path(sys.argv[flag + 1]))
    example.main(sys.argv[1:flag] + sys.argv[flag + 2:])
