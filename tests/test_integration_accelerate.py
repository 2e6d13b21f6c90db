"""The recipe in a user's accelerate loop, under `accelerate launch` with 2 CPU processes and accumulation 2.

The example `examples/accelerate_loop.py` runs in float64: the LR of every update on both ranks is the
schedule's, each epoch uses every sample once in the blocks `goyal-train` gives each rank, and the
parameters after 3 updates (and at the end) and the noise scale logged after every update are those of
one process stepping over the same micro-batches (tests/_reference.py). A run resumed from `save_state`
mid-epoch ends with the losses, noise scale and parameters of the uninterrupted one. Run as a script
under the launcher (one launch), this module runs the example, makes the mistakes of the issue one by
one in a user's loop (each stops at the first update with the audit's line), runs that resume, and
then goyal-train's own loop on accelerate, whose noise scale over 2 processes x 1 micro-batch must be
that of 1 process x 2 micro-batches over the same images.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _reference import (LARS, SCHEDULE, TOTAL_UPDATES, UPDATES_PER_EPOCH, assert_same_noise,
                        check_every_sample_once_per_epoch_in_the_trainers_blocks, check_lr_of_every_update,
                        check_noise_scale_equals_one_process, check_parameters_equal_one_process, example_data,
                        goyal_train, one_process_run, read_updates, saved_parameters)
from _runs import records
from goyal_recipe import EpochShuffleSampler, build_optimizer
from goyal_recipe.errors import RecipeMismatch

import accelerate_loop as example  # noqa: E402 - examples/, on the path through _reference

REPO = Path(__file__).parents[1]
WORLD, ACCUMULATION = 2, 2
CHECKPOINT_AT = 6  # mid-epoch 1


def launch(args, tmp_path, script):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1",
           str(script), *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """One launch: the uninterrupted run (checkpointing after update 6 on the way), the user's mistakes,
    the example resumed from that checkpoint, and goyal-train's loop (`goyal_train/`)."""
    tmp = tmp_path_factory.mktemp("accelerate")
    proc = launch([str(tmp), str(data_root)], tmp, Path(__file__))
    return tmp / "full", tmp / "resumed", proc.stdout, tmp


def test_lr_of_every_update_on_every_rank_is_the_schedule(runs):
    full, _, stdout, _ = runs
    check_lr_of_every_update(full)
    assert "update 4 lr 0.4000" in stdout and "update 8 lr 0.0400" in stdout


def test_every_sample_once_per_epoch_in_the_trainers_blocks(runs):
    check_every_sample_once_per_epoch_in_the_trainers_blocks(runs[0])


def test_parameters_equal_one_process_over_the_same_micro_batches(runs):
    check_parameters_equal_one_process(runs[0])


def test_noise_scale_equals_one_process_over_the_same_micro_batches(runs):
    check_noise_scale_equals_one_process(runs[0])


def test_save_state_mid_epoch_then_load_state_continues_exactly(runs):
    full, resumed, _, _ = runs
    for rank in range(WORLD):
        after = [r for r in read_updates(full, rank) if r["update"] >= CHECKPOINT_AT]
        again = read_updates(resumed, rank)
        assert [r["update"] for r in again] == list(range(CHECKPOINT_AT, TOTAL_UPDATES))
        # The noise scale's averages come back with the recipe's state and go on as they would have.
        assert [(r["lr"], r["loss"], r["indices"], r["noise"]) for r in again] == [
            (r["lr"], r["loss"], r["indices"], r["noise"]) for r in after]
    uninterrupted = saved_parameters(full / "params_final.pt")
    continued = saved_parameters(resumed / "params_final.pt")
    assert all(torch.equal(uninterrupted[k], continued[k]) for k in uninterrupted)


def test_goyal_train_noise_scale_two_processes_equals_one(runs, data_root, tmp_path_factory):
    """goyal-train (engine=accelerate, LARS, every update measured): 2 processes x 1 micro-batch of 8 log the
    noise scale of 1 process x 2 micro-batches over the same 16 images per update."""
    two = runs[3] / "goyal_train"
    assert records(two, "run")[0]["world_size"] == 2
    assert_same_noise(two, one_process_run(data_root, tmp_path_factory)[0])


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
    # accelerate's own idiom DataLoader(shuffle=True) on 100 samples: 13 batches of 8 (the last of 4) dealt to 2
    # processes, 7 each (the last padded with repeats), for updates of 2: a 4th update of 16 samples per epoch
    "shuffle_true": "partial_update",
    # accelerate's manual accumulation: Accelerator() without gradient_accumulation_steps, loss / A, a step every A
    # micro-batches; recipe.loss already weighted each sample 1/kn, so the update is half the paper's
    "manual_accumulation": "loss_divided_twice",
    # accelerate's resume idiom: load_state, then skip_first_batches past the epoch's batches already used; the
    # recipe's state already started the sampler there, so the skip drops an update's samples and the epoch ends early
    "skip_after_load_state": "data_skipped_twice",
}


def _mistake(name, checkpoint):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from goyal_recipe import global_batch_loss
    from goyal_recipe.integrations.accelerate import AccelerateRecipe

    accelerator = Accelerator(gradient_accumulation_steps=1 if name == "manual_accumulation" else ACCUMULATION,
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    data = example_data.dataset(torch.float64)
    if name == "shuffle_true":
        data = torch.utils.data.TensorDataset(*[t[:100] for t in data.tensors])
    net = example_data.model(torch.float64)
    recipe = AccelerateRecipe(accelerator, SCHEDULE, num_samples=len(data), per_device_batch_size=8,
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
    if name == "shuffle_true":
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    if name == "loader_not_prepared":
        net, optimizer = accelerator.prepare(net, optimizer)
        recipe.watch(net, optimizer, loader)
    else:
        net, optimizer, loader, scheduler = recipe.prepare(net, optimizer, loader)
    if name == "skip_after_load_state":
        accelerator.load_state(checkpoint)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    start = recipe.updates_done
    error = None
    try:
        for epoch in range(3 if name not in ("manual_accumulation", "skip_after_load_state") else 0):
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
        if name == "skip_after_load_state":
            # The batches of one update skipped (of the 2 updates the resumed epoch used: skipping all 4 would empty
            # the epoch, which the data's position check catches anyway): without the check, no error at all.
            skip = ACCUMULATION
            for epoch in recipe.epochs(loader):
                for x, y, _ in accelerator.skip_first_batches(loader, skip) if skip else loader:
                    with accelerator.accumulate(net):
                        accelerator.backward(recipe.loss(F.cross_entropy(net(x), y, reduction="none")))
                        optimizer.step()
                        optimizer.zero_grad()
                skip = 0
        if name == "manual_accumulation":
            for step, (x, y, _) in enumerate(loader):
                accelerator.backward(recipe.loss(F.cross_entropy(net(x), y, reduction="none")) / ACCUMULATION)
                if (step + 1) % ACCUMULATION == 0:
                    optimizer.step()
                    optimizer.zero_grad()
    except RecipeMismatch as exc:
        error = str(exc)
    unchanged = all(torch.equal(before[k], v) for k, v in net.named_parameters())
    return {"name": name, "error": error, "updates": recipe.updates_done - start, "unchanged": unchanged}


def _dispatched(split_batches: bool) -> dict:
    """The example's loop with accelerate's dispatch_batches=True (the main process reads and deals the batches),
    the loader's batch n, or n x processes with split_batches: each update's samples and LR, or the refusal."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from goyal_recipe.integrations.accelerate import AccelerateRecipe

    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, dataloader_config=DataLoaderConfiguration(
        dispatch_batches=True, split_batches=split_batches))
    data = example_data.dataset(torch.float64)
    recipe = AccelerateRecipe(accelerator, SCHEDULE, num_samples=len(data), per_device_batch_size=8, bn_group_size=8)
    net = example_data.model(torch.float64)
    loader = torch.utils.data.DataLoader(data, batch_size=8 * (WORLD if split_batches else 1), sampler=recipe.sampler)
    net, optimizer, loader, _ = recipe.prepare(net, build_optimizer(net, weight_decay=1e-4), loader)
    updates, indices = [], []
    try:
        for epoch in recipe.epochs(loader):
            for x, y, index in loader:
                with accelerator.accumulate(net):
                    accelerator.backward(recipe.loss(F.cross_entropy(net(x), y, reduction="none")))
                    optimizer.step()
                    if accelerator.sync_gradients:
                        lr = optimizer.param_groups[0]["lr"]
                    optimizer.zero_grad()
                indices += index.tolist()
                if accelerator.sync_gradients:
                    updates.append({"epoch": epoch, "lr": lr, "indices": indices})
                    indices = []
    except RecipeMismatch as exc:
        return {"error": str(exc)}
    return {"error": None, "updates": updates}


def _run_mistakes(out: Path) -> None:
    results = []
    for name in MISTAKES:
        results.append(_mistake(name, out / "checkpoint"))
    rank = int(os.environ["RANK"])
    (out / f"mistakes_rank{rank}.json").write_text(json.dumps(results))
    dispatched = {"dispatch": _dispatched(False), "dispatch_split": _dispatched(True)}
    (out / f"dispatched_rank{rank}.json").write_text(json.dumps(dispatched))


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
    assert "each sample's gradient carries 0.5 x 1/kn" in results["manual_accumulation"]["error"]
    # resumed at update 6, 2 of epoch 1's 4: the stream's first 64 samples used; 2 batches of 8 per process skipped
    assert results["skip_after_load_state"]["error"].startswith(
        "data_skipped_twice: the sampler already resumed epoch 1 at sample 64 and the loader skips 32 more")


@pytest.mark.parametrize("variant", ["dispatch", "dispatch_split"])
def test_dispatched_batches_are_the_sharded_ones(runs, variant):
    """dispatch_batches=True: the main process reads k batches and deals them out (split_batches: one batch of k x n
    cut in k). Each update takes kn = 32 fresh samples over the ranks, each sample once per epoch, at the schedule's
    LR; not refused."""
    ranks = [json.loads((runs[3] / f"dispatched_rank{rank}.json").read_text())[variant] for rank in range(WORLD)]
    assert [r["error"] for r in ranks] == [None, None]
    assert len(ranks[0]["updates"]) == TOTAL_UPDATES
    for update, per_rank in enumerate(zip(*(r["updates"] for r in ranks))):
        samples = [i for r in per_rank for i in r["indices"]]
        assert len(samples) == len(set(samples)) == 32, update
        assert all(r["lr"] == SCHEDULE.lr(update / UPDATES_PER_EPOCH) for r in per_rank)
    for epoch in range(TOTAL_UPDATES // UPDATES_PER_EPOCH):
        seen = [i for r in ranks for u in r["updates"] if u["epoch"] == epoch for i in u["indices"]]
        assert sorted(seen) == list(range(example_data.NUM_SAMPLES)), epoch


if __name__ == "__main__":  # DIR DATA: the example, the mistakes, the resumed example, goyal-train, in one launch
    out, data_root = Path(sys.argv[1]), Path(sys.argv[2])
    example.main(["--dtype", "float64", "--out", str(out / "full"), "--checkpoint-at", str(CHECKPOINT_AT),
                  "--checkpoint", str(out / "checkpoint")])
    _run_mistakes(out)
    accelerator = example.main(["--dtype", "float64", "--out", str(out / "resumed"), "--resume",
                                str(out / "checkpoint")])
    goyal_train(data_root, out, "goyal_train", **LARS)
    accelerator.end_training()
