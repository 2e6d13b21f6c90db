"""Faults during training: non-finite updates, kills, interrupted checkpoints, hostile checkpoints."""

import importlib.util
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _runs import BIN, BUFFERS, EXPECTED_LR, RECIPE, REPO, free_port, overrides, parameters, records, \
    samples_by_epoch, step_losses, train


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """One uninterrupted single-process run, keeping its checkpoints of every 2 updates."""
    out = tmp_path_factory.mktemp("reference")
    train(overrides(data_root, out, "run", **{"run.checkpoint_every_updates": 2, "run.keep_checkpoints": 6}))
    return out / "run"


def assert_same_run(run_dir, reference, rel=1e-6):
    """Every update the run logged has the reference's loss, the run reached the end, and the final weights agree."""
    losses, expected = step_losses(run_dir), step_losses(reference)
    assert max(losses) == max(expected)
    assert losses == pytest.approx({update: expected[update] for update in losses}, rel=rel)
    resumed, uninterrupted = parameters(run_dir), parameters(reference)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=rel, atol=rel / 10, msg=key)


def test_nonfinite_updates_are_skipped_by_every_rank(data_root, tmp_path):
    # The last rank's loss is NaN at iterations 3, 6 and 7: both ranks drop those updates.
    train(overrides(data_root, tmp_path, "nan", **{"run.inject_nonfinite_updates": "[3,6,7]",
                                                   "run.checkpoint_every_updates": 1, "run.keep_checkpoints": 12}),
          launcher="accelerate")
    run_dir = tmp_path / "nan"
    # A skipped update leaves the model as it was, BN running statistics included: the state saved
    # after it (rank 0's, whose loss was finite and whose forward moved its statistics) is the state
    # saved before it, to the bit. Updates 2->3 and 5->6->7 are inside one epoch (no buffer averaging).
    state = {n: load_file(run_dir / "checkpoints" / f"update_{n:09d}" / "model.safetensors") for n in (1, 2, 3, 5, 6, 7)}
    bn = [key for key in state[1] if key.endswith(BUFFERS)]
    assert len(bn) == 3 * 14  # resnet10t: 14 BN layers, running_mean / running_var / num_batches_tracked
    assert not any(torch.equal(state[1][key], state[2][key]) for key in bn)  # an applied update moves them all
    for before, after in ((2, 3), (5, 6), (5, 7)):
        for key, value in state[before].items():
            assert torch.equal(state[after][key], value), (before, after, key)
    assert [r["update"] for r in records(run_dir, "skip")] == [3, 6, 7]
    steps = records(run_dir, "step")
    assert [r["update"] for r in steps] == [1, 2, 4, 5, 8, 9, 10, 11, 12]
    # The schedule advanced only with applied updates: they used the first 9 LRs of the table.
    assert [r["lr"] for r in steps] == pytest.approx(EXPECTED_LR[:9], rel=1e-12)
    assert records(run_dir, "epoch")[-1]["skipped_updates"] == 3
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert torch.load(checkpoint / "trainer.pt", weights_only=True)["scheduler"]["updates_done"] == 9


def test_too_many_nonfinite_updates_stop_with_the_weights_from_before(data_root, tmp_path):
    args = overrides(data_root, tmp_path, "nan", **{"run.inject_nonfinite_updates": "[5,6,7,8]",
                                                    "run.max_consecutive_nonfinite": 3})
    proc = train(args, expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "4 updates in a row had a non-finite loss or gradient (from update 5)" in proc.stderr
    before, after = (tmp_path / "nan" / "checkpoints" / f"update_00000000{n}" for n in (4, 8))
    assert (after / "COMPLETE").is_file()
    weights_before, weights_after = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    for key, value in weights_before.items():  # BN running statistics too: this rank's loss was the NaN one
        assert torch.equal(value, weights_after[key]), key  # no skipped update touched the model
    momentum = [torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (before, after)]
    for index, state in momentum[0].items():
        assert torch.equal(state["momentum_buffer"], momentum[1][index]["momentum_buffer"])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_checkpoint_is_never_executed(reference, data_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    marker = tmp_path / "code-ran"
    with open(newest / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    proc = train(overrides(data_root, tmp_path, "run", **{"run.resume": "auto"}), expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "refused: resume only from checkpoints this project wrote" in proc.stderr
    assert not marker.exists()


def test_interrupted_checkpoint_writes_are_ignored(reference, data_root, tmp_path):
    """A kill during a checkpoint write leaves a temporary or marker-less directory: resume skips it."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    # The reference ends with update 12; keep 6, and fake two saves interrupted after it.
    for path in (run_dir / "checkpoints").iterdir():
        if path.name != "update_000000006":
            shutil.rmtree(path)
    partial = run_dir / "checkpoints" / "update_000000008"
    shutil.copytree(run_dir / "checkpoints" / "update_000000006", partial)
    (partial / "COMPLETE").unlink()
    (partial / "model.safetensors").write_bytes(b"truncated")
    (run_dir / "checkpoints" / ".tmp-update_000000010").mkdir()
    proc = train(overrides(data_root, tmp_path, "run", **{"run.resume": "auto", "run.checkpoint_every_updates": 2}))
    assert "at update 6" in proc.stdout and "ignoring incomplete checkpoint" in proc.stderr
    assert_same_run(run_dir, reference)


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


def test_sigkill_at_a_random_update_then_resume(reference, data_root, tmp_path):
    kill_at = random.Random(4).randint(3, 10)
    args = overrides(data_root, tmp_path, "run", **{"run.resume": "auto", "run.checkpoint_every_updates": 2})
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "goyal_recipe.cli", "train", str(RECIPE), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_update(tmp_path / "run", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    train(args)
    assert_same_run(tmp_path / "run", reference)
    for seen in samples_by_epoch(tmp_path / "run", ranks=(0,)).values():
        assert sorted(seen) == list(range(64))  # nothing skipped or repeated in the interrupted epoch


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
        assert timeout_s - 5 < waited_s < timeout_s + 15, waited_s
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


def test_torchrun_restarts_a_killed_rank_and_finishes_the_same_run(data_root, tmp_path):
    """SIGKILL of rank 1 mid-epoch under `torchrun --max-restarts 1`: the agent restarts both workers, they resume
    from the newest checkpoint by themselves, and the job ends with the losses and weights of an uninterrupted run."""
    args = {"run.resume": "auto", "run.checkpoint_every_updates": 2, "run.collective_timeout_s": 60}
    logs = {name: tmp_path / f"{name}.log" for name in ("uninterrupted", "restarted")}
    try:
        with open(logs["uninterrupted"], "w") as log:
            assert torchrun_with_restart(overrides(data_root, tmp_path, "uninterrupted", **args), log).wait(300) == 0
        with open(logs["restarted"], "w") as log:
            proc = torchrun_with_restart(overrides(data_root, tmp_path, "restarted", **args), log)
            try:
                wait_for_update(tmp_path / "restarted", 7, proc)  # inside epoch 2, after checkpoint 6
                os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
                assert proc.wait(timeout=300) == 0  # restarted and finished without help
            finally:
                if proc.poll() is None:
                    proc.terminate()  # the agent stops its workers
                    proc.wait(timeout=60)
    finally:
        for name, log in logs.items():  # shown by pytest if the test fails
            print(f"--- {name}:\n{log.read_text()[-4000:]}")
    run_dir = tmp_path / "restarted"
    starts = records(run_dir, "run")
    assert len(starts) == 2 and starts[1]["world_size"] == 2  # one restart
    assert starts[1]["resumed_at_update"] in (6, 8)  # the newest checkpoint the kill left
    assert_same_run(run_dir, tmp_path / "uninterrupted")
    for epoch, seen in samples_by_epoch(run_dir, ranks=(0, 1)).items():
        assert sorted(seen) == list(range(64)), epoch  # nothing skipped or repeated, the interrupted epoch included
