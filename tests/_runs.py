"""Running goyal-train in real processes for the end-to-end tests, and reading what a run wrote."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from goyal_recipe.metrics import read_jsonl
from goyal_recipe.records import read_run

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
RECIPE = REPO / "recipes" / "quickstart.yaml"
# 4 classes x 16 train images = 64; kn = 16 -> 4 updates per epoch; 4 x 5 = 20 validation images.
TINY = dict(num_classes=4, train_per_class=16, val_per_class=5, image_size=(32, 24), seed=0)
UPDATES_PER_EPOCH = 4
EPOCHS = 3
# Gradual warmup 0.05 -> 0.2 over the 4 updates of epoch 0, peak in epoch 1, x0.1 from epoch 2.
EXPECTED_LR = [0.05, 0.0875, 0.125, 0.1625, 0.2, 0.2, 0.2, 0.2, 0.02, 0.02, 0.02, 0.02]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def overrides(data_root, run_dir, name, **extra):
    base = {
        "run.name": name, "run.output_dir": str(run_dir), "run.log_every_updates": 1, "debug.log_samples": "true",
        "run.plots": "false", "data.root": str(data_root), "data.generate": "null", "data.image_size": 32,
        "data.workers": 0, "model.name": "resnet10t", "model.bn_group_size": 4,
        "batch.global_batch_size": 16, "batch.per_device_batch_size": 8,
        "optim.base_lr": 0.05, "optim.base_batch_size": 4,  # peak 0.05 x 16/4 = 0.2
        "optim.epochs": EPOCHS, "optim.warmup_epochs": 1, "optim.milestones": "[2]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(args, launcher="python", expect_ok=True, cpu=True, extra_env=None, log=None, port=None):
    """launcher: python (1 process), accelerate (2 processes), deepspeed (2 processes), accelerate-deepspeed.
    `log`: a file for stdout and stderr instead of a pipe, so that the call returns when the launched process
    exits rather than when the last process holding the pipe (a loader worker) closes it. `port`: the deepspeed
    launcher's master port (a free one if None)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(extra_env or {}))
    if cpu:
        env.update(ACCELERATE_USE_CPU="1", DS_ACCELERATOR="cpu")
    module = ["-m", "goyal_recipe.cli", "train", str(RECIPE), *args]
    config = {"accelerate": "cpu_2proc.yaml", "accelerate-deepspeed": "deepspeed_zero1.yaml"}
    if launcher == "python":
        env.pop("ACCELERATE_USE_CPU")  # a plain process: no launcher variables
        cmd = [sys.executable, *module]
    elif launcher in config:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_configs" / config[launcher]),
               *module]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port or free_port()), "--module", *module[1:]]
    else:
        raise ValueError(launcher)
    if log is None:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    else:
        with open(log, "w") as out:
            proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=600)
        proc.stdout, proc.stderr = Path(log).read_text(), ""
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir, kind):
    """The records of one kind as the JSON objects of their lines (``r["lr"]``), through the package's one
    reader: each update and epoch once (the last written wins after a resume), every start kept."""
    return [r.as_dict() for r in read_run(run_dir).of_kind(kind)]


def step_losses(run_dir):
    return {r.update: r.loss for r in read_run(run_dir).steps}


def samples_by_epoch(run_dir, ranks):
    """Indices used per epoch over all ranks. An update redone after a resume was logged twice:
    its last record is the one that counts, as in metrics.jsonl."""
    by_epoch = {}
    for rank in ranks:
        last = {rec["update"]: rec for rec in read_jsonl(Path(run_dir) / f"samples_rank{rank}.jsonl")}
        for rec in last.values():
            by_epoch.setdefault(rec["epoch"], []).extend(rec["indices"])
    return by_epoch


def parameters(run_dir):
    """The final parameter tensors of a run (BN running statistics left out)."""
    state = load_file(Path(run_dir) / "model.safetensors")
    return {k: v for k, v in state.items() if not k.endswith(BUFFERS)}


def last_epoch_records(run_dir) -> dict:
    """The last epoch record of each epoch, without clock fields (an epoch redone after a resume is logged twice)."""
    last = {r["epoch"]: r for r in records(run_dir, "epoch")}
    return {e: {k: v for k, v in r.items() if k not in ("time", "epoch_s")} for e, r in last.items()}


def last_samples(run_dir, rank: int = 0) -> dict:
    """{update: (epoch, indices)}: the last samples record of each update of a rank."""
    return {r["update"]: (r["epoch"], r["indices"]) for r in read_jsonl(Path(run_dir) / f"samples_rank{rank}.jsonl")}


def assert_same_run(run_dir, reference, samples: bool = True) -> None:
    """Bit for bit: each update's loss, every tensor of the final weights (BN buffers too), the epoch records
    and (with `samples`) the samples of every update."""
    assert step_losses(run_dir) == step_losses(reference)
    resumed, uninterrupted = load_file(Path(run_dir) / "model.safetensors"), load_file(Path(reference) / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    assert last_epoch_records(run_dir) == last_epoch_records(reference)
    if samples:
        assert last_samples(run_dir) == last_samples(reference)


def assert_lr_table(run_dir, world_size: int) -> list[dict]:
    """The step records of a tiny run (one per update): the LR of every update is the schedule's at the
    update's fractional epoch, equal to EXPECTED_LR, in the run's own header and in what lr.png draws."""
    from goyal_recipe import Schedule
    from goyal_recipe.report import schedule_points

    schedule = Schedule(global_batch_size=16, base_lr=0.05, base_batch_size=4, warmup_epochs=1, milestones=(2,),
                        epochs=EPOCHS)
    steps = records(run_dir, "step")
    assert [r["update"] for r in steps] == list(range(1, EPOCHS * UPDATES_PER_EPOCH + 1))
    assert [r["lr"] for r in steps] == pytest.approx(EXPECTED_LR, rel=1e-12)
    for r in steps:  # the LR used by update t (0-based) is Schedule.lr(t / updates_per_epoch)
        assert r["lr"] == pytest.approx(schedule.lr((r["update"] - 1) / UPDATES_PER_EPOCH), rel=1e-12)
        assert r["epoch"] == r["update"] / UPDATES_PER_EPOCH
    header = records(run_dir, "run")
    assert len(header) == 1 and (header[0]["updates_per_epoch"], header[0]["world_size"]) == \
        (UPDATES_PER_EPOCH, world_size)
    planned = schedule_points(run_dir, UPDATES_PER_EPOCH)  # from the saved config.yaml
    assert [lr for _, lr in planned] == pytest.approx(EXPECTED_LR, rel=1e-12)
    return steps

