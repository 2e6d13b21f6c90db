"""Faults during training: non-finite updates, kills, interrupted checkpoints, hostile checkpoints."""

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

from _runs import BIN, EXPECTED_LR, RECIPE, REPO, overrides, parameters, records, samples_by_epoch, \
    step_losses, train


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
    train(overrides(data_root, tmp_path, "nan", **{"run.inject_nonfinite_updates": "[3,6,7]"}), launcher="accelerate")
    run_dir = tmp_path / "nan"
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
    for key, value in weights_before.items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, weights_after[key]), key  # no skipped update touched a weight
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
