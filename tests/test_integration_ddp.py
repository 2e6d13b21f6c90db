"""The recipe in a plain DistributedDataParallel loop under torchrun, 2 CPU processes, accumulation 2.

The example `examples/ddp_loop.py` runs in float64: the LR of every update on both ranks is the
schedule's, each epoch uses every sample once in `goyal-train`'s blocks, and the parameters after 3
updates (and at the end) and the noise scale logged after every update are those of one process over
the same micro-batches (tests/_reference.py). Run as a script under torchrun (one launch), this module
runs the example, then resumes a loop from `recipe.state_dict()` mid-epoch (it must continue exactly)
and makes a DDP user's mistakes; each stops at the first update (or the first of the next epoch) with
the audit's line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _reference import (SCHEDULE, UPDATES_PER_EPOCH, check_every_sample_once_per_epoch_in_the_trainers_blocks,
                        check_lr_of_every_update, check_noise_scale_equals_one_process,
                        check_parameters_equal_one_process, example_data)
from goyal_recipe import EpochShuffleSampler, build_optimizer
from goyal_recipe.errors import RecipeMismatch

REPO = Path(__file__).parents[1]
WORLD = 2


def torchrun(args, tmp_path, script):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(WORLD),
           str(script), *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One launch: the example in float64, then the resume and the mistakes below."""
    tmp = tmp_path_factory.mktemp("ddp")
    proc = torchrun(["--scenarios", str(tmp)], tmp, Path(__file__))
    return tmp / "out", proc.stdout, tmp


def test_lr_of_every_update_on_every_rank_is_the_schedule(run):
    out, stdout, _ = run
    check_lr_of_every_update(out)
    assert "update 3 lr 0.3250" in stdout and "update 8 lr 0.0400" in stdout


def test_every_sample_once_per_epoch_in_the_trainers_blocks(run):
    check_every_sample_once_per_epoch_in_the_trainers_blocks(run[0])


def test_parameters_equal_one_process_over_the_same_micro_batches(run):
    check_parameters_equal_one_process(run[0])


def test_noise_scale_equals_one_process_over_the_same_micro_batches(run):
    check_noise_scale_equals_one_process(run[0])


def one_process_recipe(**overrides):
    from goyal_recipe.integrations.ddp import DDPRecipe

    return DDPRecipe(SCHEDULE, **{"num_samples": example_data.NUM_SAMPLES, "per_device_batch_size": 8, **overrides})


def test_recipe_derives_accumulation_and_refuses_a_broken_batch_chain():
    from goyal_recipe.errors import UserError

    recipe = one_process_recipe()  # no process group: one process, kn = 32 = 8 x 4 micro-batches
    assert (recipe.world_size, recipe.accumulation_steps, recipe.updates_per_epoch) == (1, 4, 4)
    with pytest.raises(UserError, match=r"^kn = 32 is not a whole number of micro-batches of 12 on 1 processes"):
        one_process_recipe(per_device_batch_size=12)
    with pytest.raises(UserError, match=r"^16 samples do not fill one update of kn = 32"):
        one_process_recipe(num_samples=16)


def test_recipe_state_puts_the_data_where_the_lr_is():
    from goyal_recipe.errors import UserError

    recipe = one_process_recipe()
    optimizer = build_optimizer(example_data.model())
    recipe.make_scheduler(optimizer)
    recipe.load_state_dict({"global_batch_size": 32, "updates_per_epoch": 4, "seed": 0,
                            "scheduler": {"updates_done": 6, "updates_per_epoch": 4, "last_epoch": 6}})
    assert recipe.position() == (1, 64) and (recipe.sampler.epoch, recipe.sampler.start) == (1, 64)
    recipe.sampler.set_epoch(1)  # a framework setting the epoch again keeps the resumed offset...
    assert list(recipe.sampler) == recipe.sampler.rank_indices(1)[64:].tolist()
    recipe.sampler.set_epoch(1)  # ... until the resumed epoch has been read
    assert recipe.sampler.start == 0
    assert list(recipe.epochs()) == [1, 2]
    with pytest.raises(UserError, match=r"^the checkpoint has global_batch_size = 64 but this run has 32"):
        recipe.load_state_dict({**recipe.state_dict(), "global_batch_size": 64})


def test_each_epoch_starts_an_update_whatever_the_last_epoch_left():
    recipe = one_process_recipe()  # accumulation 4
    model, updates = torch.nn.Linear(2, 2), []
    for epoch in recipe.epochs():
        for _ in range(5 if epoch == 0 else 4):  # epoch 0 leaves one micro-batch past its last update
            with recipe.accumulate(model) as update:
                updates.append((epoch, update))
        if epoch == 1:
            break
    assert [update for epoch, update in updates if epoch == 1] == [False, False, False, True]


def test_only_back_propagated_losses_count_as_used_data():
    """The data's position counts the micro-batches whose loss was back-propagated: a loss computed with gradients
    on and never back-propagated (an evaluation without no_grad) used no training data."""
    recipe = one_process_recipe(bn_group_size=8)
    net = example_data.model(torch.float64)
    recipe.make_scheduler(build_optimizer(net))
    x, y, _ = example_data.dataset(torch.float64)[:8]
    recipe.loss(F.cross_entropy(net(x), y, reduction="none"))  # evaluated, not back-propagated
    assert recipe.state_dict()["micro_batches"] == 0
    recipe.loss(F.cross_entropy(net(x), y, reduction="none")).backward()
    assert recipe.state_dict()["micro_batches"] == 1


def test_resume_after_a_loss_scalers_skipped_updates_continues_the_data():
    """fp16: GradScaler skips the first 3 updates (overflow), whose micro-batches are used without an update. A loop
    checkpointed after 3 real updates and resumed takes the micro-batches, LRs and weights of the uninterrupted one
    (the data's position counts the skipped updates; the LR's does not). Before: the resumed loop read the last 3
    updates' micro-batches again."""
    def run(stop_after=None, state=None):
        data, net = example_data.dataset(torch.float64), example_data.model(torch.float64)
        recipe = one_process_recipe(num_samples=len(data), bn_group_size=8)  # kn 32 = 4 micro-batches of 8
        optimizer = build_optimizer(net, weight_decay=1e-4)
        scheduler = recipe.make_scheduler(optimizer)
        loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=recipe.sampler)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        attempts = 0
        if state is not None:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            recipe.load_state_dict(state["recipe"])
            attempts = state["attempts"]
        recipe.watch(net, optimizer, loader, grad_scaler=scaler)
        seen, lrs = [], []
        for epoch in recipe.epochs():
            for x, y, index in loader:
                with recipe.accumulate(net) as update:
                    loss = recipe.loss(F.cross_entropy(net(x), y, reduction="none"))
                    scaler.scale(loss * (float("inf") if attempts < 3 else 1.0)).backward()
                seen.append(index.tolist())
                if update:
                    done = recipe.updates_done
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad()
                    attempts += 1
                    if recipe.updates_done > done:
                        lrs.append(optimizer.param_groups[0]["lr"])
                    if recipe.updates_done == stop_after:
                        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "attempts": attempts,
                                "scaler": scaler.state_dict(), "recipe": recipe.state_dict()}, seen, lrs
        return net.state_dict(), seen, lrs

    full, seen, lrs = run()
    assert len(lrs) == 3 * UPDATES_PER_EPOCH - 3  # 3 updates' data went to the skipped attempts
    state, seen_first, lrs_first = run(stop_after=3)
    assert state["recipe"]["micro_batches"] == 6 * 4  # 3 skipped and 3 real updates of 4 micro-batches
    resumed, seen_rest, lrs_rest = run(state=state)
    assert seen_first + seen_rest == seen and lrs_first + lrs_rest == lrs
    assert all(torch.equal(resumed[k], v) for k, v in full.items())


# ---------------------------------------------------------------------------------------------------
# Resume and mistakes, in a user's loop (run under torchrun by the `run` fixture)

MISTAKES = {
    "mean_loss": "loss_unchecked",  # a per-micro-batch mean, accumulated over 2 micro-batches: 2x the gradient
    "sampler_not_split": "data_not_split",  # every rank reads the whole epoch
    "no_set_epoch": "sampler_not_reshuffled",  # epoch 1 repeats epoch 0's order: refused at its first update
    "scheduler_only_resume": "data_position",  # the LR restored, the data not: epoch 1 restarts at its first sample
    # torch's DistributedSampler on 100 samples: 50 per rank, 7 micro-batches of 8 (the last of 2) per epoch for
    # updates of 2: the 4th update would take 20 samples, across two epochs
    "dist_sampler": "partial_update",
}


def _loop(name=None, *, state=None, stop_after=None):
    """Build the example's loop (with one mistake), optionally restore `state`, train; returns what happened."""
    from torch.nn.parallel import DistributedDataParallel

    from goyal_recipe.integrations.ddp import DDPRecipe

    data = example_data.dataset(torch.float64)
    if name == "dist_sampler":
        data = torch.utils.data.TensorDataset(*[t[:100] for t in data.tensors])
    recipe = DDPRecipe(SCHEDULE, num_samples=len(data), per_device_batch_size=8, bn_group_size=8,
                       noise_scale_every_updates=2)
    net = DistributedDataParallel(example_data.model(torch.float64), broadcast_buffers=False)
    optimizer = build_optimizer(net, weight_decay=1e-4)
    scheduler = recipe.make_scheduler(optimizer)
    sampler = EpochShuffleSampler(len(data), batch_size=8, accumulation_steps=4) if name == "sampler_not_split" \
        else recipe.sampler
    if name == "dist_sampler":
        sampler = torch.utils.data.DistributedSampler(data, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    if state is not None:
        net.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if name == "scheduler_only_resume":
            scheduler.load_state_dict(state["recipe"]["scheduler"])
        else:
            recipe.load_state_dict(state["recipe"])
    recipe.watch(net, optimizer, loader)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    start, losses, error = recipe.updates_done, [], None
    epochs = range(recipe.epoch, 3) if name in ("no_set_epoch", "scheduler_only_resume") else recipe.epochs()
    try:
        for epoch in epochs:
            if name == "scheduler_only_resume":
                sampler.set_epoch(epoch)  # the user's own epoch loop: the epoch is right, its first samples are not
            for x, y, _ in loader:
                with recipe.accumulate(net) as update_now:
                    per_sample = F.cross_entropy(net(x), y, reduction="none")
                    loss = per_sample.mean() if name == "mean_loss" else recipe.loss(per_sample)
                    loss.backward()
                losses.append(loss.item())
                if update_now:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    if recipe.updates_done == stop_after:
                        return {"model": {k: v.clone() for k, v in net.module.state_dict().items()},
                                "optimizer": optimizer.state_dict(), "recipe": recipe.state_dict()}
    except RecipeMismatch as exc:
        error = str(exc)
    return {"name": name, "error": error, "updates": recipe.updates_done - start, "losses": losses,
            "noise": recipe.noise_scale.state_dict(),
            "unchanged": all(torch.equal(before[k], v) for k, v in net.named_parameters()),
            "params": {k: v.tolist() for k, v in net.module.named_parameters()}}


def _run_resume_and_mistakes(out: Path) -> None:
    import torch.distributed as dist

    results = {}
    full = _loop()
    saved = _loop(stop_after=6)  # mid-epoch 1
    resumed = _loop(state=saved)
    results["resume"] = {"full_losses": full["losses"][12:], "resumed_losses": resumed["losses"],
                         "equal": full["params"] == resumed["params"], "updates": resumed["updates"],
                         "noise": (full["noise"], resumed["noise"]),
                         "error": resumed["error"]}
    for name in MISTAKES:
        results[name] = _loop(name, state=saved if name == "scheduler_only_resume" else None)
        results[name].pop("params")
    (out / f"results_rank{dist.get_rank()}.json").write_text(json.dumps(results))


def test_resume_and_mistakes(run):
    for rank in range(WORLD):
        results = json.loads((run[2] / f"results_rank{rank}.json").read_text())
        resume = results["resume"]
        # Updates 6..11 of the uninterrupted loop (2 micro-batches each): same losses, same final parameters.
        assert resume["error"] is None and resume["updates"] == 6
        assert resume["resumed_losses"] == resume["full_losses"] and resume["equal"]
        # The noise scale measured on every 2nd update: its averages saved mid-epoch go on exactly.
        full_noise, resumed_noise = resume["noise"]
        assert full_noise == resumed_noise and full_noise["tracker"]["updates"] == 6
        for name, code in MISTAKES.items():
            r = results[name]
            assert r["error"] is not None and r["error"].startswith(f"{code}: "), (name, r["error"])
            assert "\n" not in r["error"]
            if name == "no_set_epoch":  # epoch 0 is right; epoch 1 stops before its first update
                assert r["updates"] == UPDATES_PER_EPOCH, r
            else:
                assert r["updates"] == 0 and r["unchanged"], (name, r)


if __name__ == "__main__":  # --scenarios DIR: the example's loop, then the scenarios, in one process group
    import torch.distributed as dist

    import ddp_loop as example  # examples/, on the path through _reference

    out = Path(sys.argv[sys.argv.index("--scenarios") + 1])
    dist.init_process_group("gloo")
    example.train(torch.float64, out / "out")
    _run_resume_and_mistakes(out)
    dist.destroy_process_group()
