"""The one-process reference of the integration tests, and what the examples' runs are checked against.

`reference_updates` gives the micro-batches that the ranks of a loop under test step over together
(goyal-train's order: one permutation per epoch, kn samples per update in blocks of the micro-batch);
`reference_parameters` steps one process over them with the recipe's update (`reference_run`: and the
noise scale of each update from its micro-batches' own gradients). The accelerate and DDP
examples train the same problem (`example_data`'s MLP) and write the same records (`--out DIR`): the
checks of those runs are here once.
"""

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from goyal_recipe import EpochShuffleSampler, GoyalLR, GradientNoiseScale, build_optimizer

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


def reference_run(model, optimizer, scheduler, updates, loss_of, global_batch_size: int
                  ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """One process over `updates` (from `reference_updates`): `loss_of(block)` (the block's share of the
    kn mean) back-propagated for each micro-batch, then one optimizer step and one scheduler step.

    Returns the parameters after each update, and the noise scale's averages after each (a
    `GradientNoiseScale` fed, per update, the mean squared norm of the micro-batch mean gradients,
    kn / n times each block's own gradient, and the squared norm of their mean, the update's `.grad`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    noise, states, fields = GradientNoiseScale(), [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend with the other tests' processes
    try:
        for micro_batches in updates:
            _reference_update(model, params, optimizer, scheduler, micro_batches, loss_of, global_batch_size, noise)
            states.append({name: p.detach().clone() for name, p in model.named_parameters()})
            fields.append({"noise_scale": noise.b_simple, "noise_grad_sq": noise.grad_sq,
                           "noise_trace_sigma": noise.trace_sigma})
    finally:
        torch.set_num_threads(threads)
    return states, fields


def _reference_update(model, params, optimizer, scheduler, micro_batches, loss_of, global_batch_size, noise):
    """One update of `reference_run`: each block's own gradient (autograd.grad) accumulated into .grad."""
    small = []
    for block in micro_batches:
        grads = torch.autograd.grad(loss_of(block), params)
        small.append(sum(float(g.double().square().sum()) for g in grads) * (global_batch_size / len(block)) ** 2)
        for p, g in zip(params, grads):
            p.grad = g if p.grad is None else p.grad.add_(g)
    big = sum(float(p.grad.double().square().sum()) for p in params)
    noise.update(sum(small) / len(small), len(micro_batches[0]), big, global_batch_size)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def reference_parameters(model, optimizer, scheduler, updates, loss_of) -> list[dict[str, torch.Tensor]]:
    """The parameters after each update of `reference_run`."""
    kn = sum(len(block) for block in updates[0])
    return reference_run(model, optimizer, scheduler, updates, loss_of, kn)[0]


def check_noise_scale(got: list[dict], expected: list[dict], rel: float) -> None:
    """A run's logged noise scale after each update against the reference's: same images, same estimate,
    whatever the split into ranks and micro-batches."""
    assert len(got) == len(expected)
    for update, (a, b) in enumerate(zip(got, expected)):
        for key, value in b.items():
            assert a[key] == (None if value is None else pytest.approx(value, rel=rel)), (update, key, a[key], value)
    # The estimates move with the weights: a constant would not pass as every update's.
    assert len({round(b["noise_grad_sq"], 12) for b in expected}) == len(expected)


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


@functools.cache
def mlp_reference(updates: int) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """One process, float64: each micro-batch's loss summed / kn (BN over each), torch SGD with GoyalLR;
    the parameters and the noise scale after each update (`reference_run`)."""
    data = example_data.dataset(torch.float64)
    net = example_data.model(torch.float64)
    optimizer = build_optimizer(net, weight_decay=1e-4)

    def loss_of(block):
        x, y, _ = data[block]
        return F.cross_entropy(net(x), y, reduction="sum") / KN

    return reference_run(net, optimizer, GoyalLR(optimizer, SCHEDULE, UPDATES_PER_EPOCH),
                         reference_updates(example_data.NUM_SAMPLES, KN, N, updates), loss_of, KN)


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
    expected = mlp_reference(TOTAL_UPDATES)[0]
    for update, path in ((3, out / "params_update3.pt"), (TOTAL_UPDATES, out / "params_final.pt")):
        got = saved_parameters(path)
        assert got.keys() == expected[update - 1].keys()
        for name, value in got.items():
            torch.testing.assert_close(value, expected[update - 1][name], rtol=1e-12, atol=1e-13)
    # The naive loss would have halved every update: the reference is not trivially met.
    start = dict(example_data.model(torch.float64).named_parameters())
    assert any((expected[2][k] - start[k]).abs().max() > 1e-3 for k in start)


def check_noise_scale_equals_one_process(out: Path) -> None:
    """The noise scale each rank logged after every update (2 ranks x 2 micro-batches of 8) is one process's
    over the same 4 micro-batches, in float64."""
    expected = mlp_reference(TOTAL_UPDATES)[1]
    for rank in range(WORLD):
        check_noise_scale([r["noise"] for r in read_updates(out, rank)], expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# goyal-train's noise scale: 2-process runs inside the accelerate and DeepSpeed integration launches,
# against the same recipe in one process (engine=local, 2 micro-batches of 8: the same 16 images per update)

NOISE_KEYS = ("noise_scale", "noise_grad_sq", "noise_trace_sigma")
EVERY_UPDATE = {"run.noise_scale_every_updates": 1}
# LARS with polynomial decay, 4 updates of kn = 16.
LARS = {"optim.optimizer": "lars", "optim.decay": "poly", "optim.weight_decay": 5e-4, "optim.nesterov": "false",
        "run.max_updates": 4, **EVERY_UPDATE}
# ZeRO-1 (SGD: ZeRO-1 refuses LARS), measuring every 2nd of 3 updates.
ZERO1 = {"engine": "deepspeed", "deepspeed.zero_stage": 1, "run.max_updates": 3, "run.noise_scale_every_updates": 2}


def goyal_train(data_root: Path, out: Path, name: str, **extra) -> None:
    """goyal-train's loop in this process (under a launcher: one of its ranks)."""
    from _runs import RECIPE, overrides
    from goyal_recipe.config import load_config
    from goyal_recipe.trainer import train

    train(load_config(RECIPE, overrides(data_root, out, name, **{"run.keep_freed_cpu_memory": "false", **extra})))


_ONE_PROCESS_RUNS: dict[str, tuple[Path, str]] = {}


def one_process_run(data_root: Path, tmp_path_factory) -> tuple[Path, str]:
    """The LARS recipe as 1 process x 2 micro-batches of 8, in this process (engine=local, TensorBoard and
    plots on), run once per test session and shared by the tests that compare a split with it: its run
    directory and what it printed and logged."""
    from _loop import run_local

    if str(data_root) not in _ONE_PROCESS_RUNS:
        out = tmp_path_factory.mktemp("one_process")
        with logged() as lines:
            run = run_local(data_root, out, "one", **LARS, **{"run.trackers": "[tensorboard]", "run.plots": "true"})
        _ONE_PROCESS_RUNS[str(data_root)] = run, "\n".join(lines)
    return _ONE_PROCESS_RUNS[str(data_root)]


class logged:
    """What an in-process run prints and logs (a launched run's stdout and stderr), as lines."""

    def __enter__(self):
        import contextlib
        import io
        import logging

        self.lines, self.logger = [], logging.getLogger("goyal_recipe")
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = lambda record: self.lines.append(record.getMessage())
        self.logger.addHandler(self.handler)
        self.stdout = io.StringIO()
        self.redirect = contextlib.redirect_stdout(self.stdout)
        self.redirect.__enter__()
        return self.lines

    def __exit__(self, *exc):
        self.redirect.__exit__(*exc)
        self.logger.removeHandler(self.handler)
        self.lines += self.stdout.getvalue().splitlines()



def noise_records(run_dir: Path) -> list[dict]:
    from _runs import records

    return [{k: r[k] for k in ("update", *NOISE_KEYS)} for r in records(run_dir, "step")]


def assert_same_noise(run_dir: Path, reference: Path, updates: int | None = None) -> None:
    """The step records' noise scale equals the reference run's (float32 runs: to 1e-4)."""
    got, want = noise_records(run_dir), noise_records(reference)
    if updates:
        got, want = got[:updates], want[:updates]
    assert [r["update"] for r in got] == [r["update"] for r in want]
    for a, b in zip(got, want):
        for key in NOISE_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4), (run_dir.name, a["update"], key)
