"""Faults during training that need several processes: a non-finite loss on one rank, a dead or stalled rank.
Single-process faults (non-finite updates, kills, interrupted or hostile checkpoints) are in test_loop.py; the
2-process kill, resume and torchrun restart in test_trainer.py."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _runs import BIN, BUFFERS, EXPECTED_LR, RECIPE, REPO, free_port, overrides, records, train


def test_a_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(data_root, tmp_path):
    """The last rank's loss is NaN at update 3 (rank 0's is finite, and its forward moved its BN statistics):
    both ranks drop the update, each with its model as it was, BN running statistics included."""
    train(overrides(data_root, tmp_path, "nan", **{"debug.inject_nonfinite_updates": "[3]", "run.max_updates": 4,
                                                   "run.checkpoint_every_updates": 1, "run.keep_checkpoints": 4}),
          launcher="accelerate")
    run_dir = tmp_path / "nan"
    path = {n: run_dir / "checkpoints" / f"update_{n:09d}" for n in (1, 2, 3, 4)}
    model = {n: load_file(path[n] / "model.safetensors") for n in (1, 2, 3)}  # rank 0's module state
    bn = [key for key in model[1] if key.endswith(BUFFERS)]
    assert len(bn) == 3 * 14 and not any(torch.equal(model[1][key], model[2][key]) for key in bn)
    for key, value in model[2].items():
        assert torch.equal(model[3][key], value), key
    for rank in (0, 1):  # each rank's own BN statistics, saved per rank
        before, after = (load_file(path[n] / f"buffers_rank{rank}.safetensors") for n in (2, 3))
        assert len(before) == 2 * 14 and all(torch.equal(after[key], value) for key, value in before.items()), rank
    assert [r["update"] for r in records(run_dir, "skip")] == [3]
    steps = records(run_dir, "step")
    assert [r["update"] for r in steps] == [1, 2, 4]
    assert [r["lr"] for r in steps] == pytest.approx(EXPECTED_LR[:3], rel=1e-12)
    assert torch.load(path[4] / "trainer.pt", weights_only=True)["scheduler"]["updates_done"] == 3


def wait_for_update(run_dir, update, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = Path(run_dir) / "metrics.jsonl"
        if path.is_file() and any(r["update"] >= update for r in records_safe(path)):
            return
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    raise TimeoutError(f"update {update} not reached")


def records_safe(path):
    import json

    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        if record.get("kind") == "step":
            out.append(record)
    return out


def worker_pid(launcher_pid, rank):
    """The pid of the worker with RANK=rank among the launcher's children."""
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise LookupError(f"no worker with RANK={rank} under pid {launcher_pid}")


def test_a_dead_rank_ends_the_job_instead_of_hanging(data_root, tmp_path):
    """SIGKILL of rank 1 during training: the surviving rank stops and the launch fails within a minute."""
    args = overrides(data_root, tmp_path, "run", **{"run.collective_timeout_s": 60})
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
           "-m", "goyal_recipe.cli", "train", str(RECIPE), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_update(tmp_path / "run", 3, proc)
    survivor = worker_pid(proc.pid, 0)
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    killed_at = time.time()
    assert proc.wait(timeout=120) != 0
    assert time.time() - killed_at < 60
    assert not Path(f"/proc/{survivor}").exists() or b"State:\tZ" in Path(f"/proc/{survivor}/status").read_bytes()
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("engine,stop", [
    ("accelerate", signal.SIGKILL),
    ("accelerate", signal.SIGSTOP),
    pytest.param("deepspeed", signal.SIGSTOP, marks=pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")),
], ids=["accelerate-sigkill", "accelerate-sigstop", "deepspeed-sigstop"])
def test_collective_timeout_without_a_launcher(data_root, tmp_path, engine, stop):
    """Two plain processes that no launcher watches; rank 1 dies (SIGKILL) or stalls (SIGSTOP) mid-run. Rank 0
    fails instead of hanging: a dead peer's closed sockets fail its next collective at once, a stalled peer's
    open ones only through run.collective_timeout_s, which DeepSpeed's gradient all-reduce must honour too."""
    timeout_s = 20
    args = overrides(data_root, tmp_path, "run", engine=engine,
                     **{"run.collective_timeout_s": timeout_s, "optim.epochs": 50})  # 200 updates: still running when stopped
    port = free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    ranks = []
    for rank, log in enumerate(logs):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", DS_ACCELERATOR="cpu",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        with open(log, "w") as out:
            ranks.append(subprocess.Popen([sys.executable, "-m", "goyal_recipe.cli", "train", str(RECIPE), *args],
                                          cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        wait_for_update(tmp_path / "run", 3, ranks[0])
        ranks[1].send_signal(stop)
        stopped_at = time.time()
        returncode = ranks[0].wait(timeout=timeout_s + 60)
        waited_s = time.time() - stopped_at
    finally:
        for proc in ranks:  # SIGKILL also ends a stopped process
            proc.kill()
            proc.wait()
        for rank, log in enumerate(logs):  # shown by pytest if the test fails
            print(f"--- rank {rank}:\n{log.read_text()[-3000:]}")
    assert returncode != 0
    if stop == signal.SIGSTOP:
        # rank 0 may have been waiting up to an update longer than the signal is old
        assert timeout_s - 5 < waited_s < timeout_s + 30, waited_s  # the teardown is slow on a loaded machine
        assert f"Timed out waiting {timeout_s * 1000}ms" in logs[0].read_text()
    else:
        assert waited_s < timeout_s, waited_s
    assert not (tmp_path / "run" / "model.safetensors").exists()


def torchrun_with_restart(args, log):
    """2 CPU workers under torchrun's elastic agent, allowed one restart: c10d rendezvous on a free local port, and
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that every attempt meets in a new store (in the agent's shared one the
    restarted workers read the dead attempt's gloo addresses; see accelerate_configs/README.md)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1",
           "-m", "goyal_recipe.cli", "train", str(RECIPE), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
