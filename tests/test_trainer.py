"""End-to-end runs of goyal-train in real processes: 2 processes under accelerate launch and torchrun (killed,
resumed, restarted), the console script, the quickstart; against one process of engine=local in the test process.
The loop's single-process rules are in test_loop.py."""

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _loop import run_local
from _runs import EPOCHS, assert_lr_table, overrides, parameters, records, samples_by_epoch, step_losses, train
from goyal_recipe.progress import UpdateSums


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """The same recipe as 2 processes x 8 images under accelerate launch (JPEG folders), and as 1 process x 2
    accumulation micro-batches of 8 (engine=local in this process; the same images from the parquet shards, with
    TensorBoard logging)."""
    out = tmp_path_factory.mktemp("runs")
    train(overrides(data_root, out, "two_procs"), launcher="accelerate")
    run_local(data_root, out, "one_proc", **{"data.source": "parquet", "run.trackers": "[tensorboard]"})
    return out


def test_two_processes_lr_coverage_and_exact_validation(runs):
    run_dir = runs / "two_procs"
    steps = assert_lr_table(run_dir, world_size=2)
    one_proc = records(runs / "one_proc", "step")
    assert [r["lr"] for r in steps] == pytest.approx([r["lr"] for r in one_proc], rel=1e-12)

    by_epoch = samples_by_epoch(run_dir, ranks=(0, 1))
    assert sorted(by_epoch) == list(range(EPOCHS))
    for epoch, seen in by_epoch.items():
        assert sorted(seen) == list(range(64)), epoch  # each sample exactly once per epoch
    assert by_epoch[0] != by_epoch[1]

    epochs = records(run_dir, "epoch")
    assert [r["val_images"] for r in epochs] == [20] * EPOCHS


def test_exported_weights_load_into_timm_and_tensorboard_logs(runs):
    timm = pytest.importorskip("timm")
    path = runs / "two_procs" / "model.safetensors"
    # num_classes in the overlay too: otherwise timm drops a classifier whose size differs from its 1000.
    model = timm.create_model("resnet10t", num_classes=4, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=4))
    saved = load_file(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    assert list((runs / "one_proc" / "tracking").rglob("events.out.tfevents*"))


def test_workers_equal_accumulation(runs):
    """Footnote 5: k workers x n and 1 worker x k accumulation micro-batches of n are the same SGD."""
    # The SGD trajectory is the same; BN running statistics are not compared: k workers update
    # them once per update and are averaged, accumulation updates them once per micro-batch.
    two, one = parameters(runs / "two_procs"), parameters(runs / "one_proc")
    assert two.keys() == one.keys() and len(two) == 44  # every parameter tensor of resnet10t
    for key in two:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    assert step_losses(runs / "two_procs") == pytest.approx(step_losses(runs / "one_proc"), rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 CUDA devices")
def test_sync_bn_over_two_processes_equals_one_batch(data_root, tmp_path):
    """SyncBN over 2 x 8 images normalises exactly as BN over one micro-batch of 16."""
    train(overrides(data_root, tmp_path, "sync", **{"model.bn": "sync"}), launcher="accelerate", cpu=False)
    train(overrides(data_root, tmp_path, "single", **{"model.bn": "per_device", "batch.per_device_batch_size": 16}))
    synced, single = load_file(tmp_path / "sync" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    for key in single:
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(synced[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


def test_bf16_channels_last_switches_change_speed_only(runs, data_root, tmp_path):
    fast = {"model.precision": "bf16", "model.channels_last": "true", "data.source": "parquet", "run.max_updates": 3}
    run_local(data_root, tmp_path, "bf16", **fast)
    reference = step_losses(runs / "one_proc")
    assert sorted(step_losses(tmp_path / "bf16")) == [1, 2, 3]
    for update, loss in step_losses(tmp_path / "bf16").items():
        assert loss == pytest.approx(reference[update], rel=0.05)


# The console script as its own process, alone and under a launcher; every message of the table of bad input is
# checked in-process by test_config_errors.py.
@pytest.mark.parametrize("extra,message", [
    (["optim.warmpu=constant"], "unknown key optim.warmpu"),
    (["model.bn=sync", "__2procs__"], "model.bn=sync needs CUDA devices"),
])
def test_bad_config_one_line_error(data_root, tmp_path, extra, message):
    processes = 2 if "__2procs__" in extra else 1
    extra = [e for e in extra if e != "__2procs__"]
    proc = train(overrides(data_root, tmp_path, "bad") + extra, launcher="accelerate" if processes == 2 else "python",
                 expect_ok=False)
    if processes == 1:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
    else:  # torchrun reports a worker that exited 2 with exit code 1 and a traceback of its own
        assert proc.returncode == 1 and "]: Traceback" not in proc.stderr and "exitcode  : 2" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("goyal-train: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize("image_size", [32, pytest.param(48, marks=pytest.mark.slow)], ids=["32px", "48px"])
def test_quickstart_learns(tmp_path, image_size):
    """The quickstart recipe, shortened to 4 epochs (28 updates), ends far below chance: 90 % top-1 and 50 % top-5
    error on 10 classes. So few updates at eta = 0.4 leave the top-1 error noisy, so its bound leaves room and the
    top-5 bound carries the signal too. Measured on torch 2.13 and pillow 13: 46.5 % top-1 at the recipe's 48 px
    (the slow case); 55.0 % top-1 and 6.5 % top-5 with crops of 32 px, the default case (about half the compute)."""
    args = [f"run.output_dir={tmp_path}", "run.resume=none", "optim.epochs=4", "optim.warmup_epochs=2",
            "optim.milestones=[3]", f"data.root={tmp_path / 'data'}", "data.generate.train_per_class=100",
            "data.generate.val_per_class=20", "run.plots=true", f"data.image_size={image_size}"]
    mark = f"quickstart-{os.getpid()}-{image_size}"
    proc = train(args, extra_env={"GOYAL_TEST_RUN": mark}, log=tmp_path / "train.log")
    last = records(tmp_path / "quickstart", "epoch")[-1]
    assert last["val_images"] == 200
    assert last["val_top1_error"] < 70, proc.stdout[-2000:]
    assert last["val_top5_error"] < 20, proc.stdout[-2000:]
    assert {p.name for p in (tmp_path / "quickstart" / "plots").iterdir()} >= {"error.png", "lr.png"}
    # The process ends without the interpreter's finalisation (cli._exit_finished): its output is complete and
    # its 2 loader workers are gone when it is.
    assert proc.stdout.rstrip().splitlines()[-1].startswith("plot: "), proc.stdout[-500:]
    assert not _processes_with_env(f"GOYAL_TEST_RUN={mark}".encode())


def _processes_with_env(entry: bytes) -> list[int]:
    """Pids of live processes whose environment holds `entry` (KEY=value)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


# --- Two processes killed and resumed: every piece of rank-local state survives a checkpoint ------------------

def _by_epoch(run_dir):
    """The last epoch record of each epoch (an epoch redone after a resume was logged twice), without clock fields."""
    last = {r["epoch"]: r for r in records(run_dir, "epoch")}
    return {e: {k: v for k, v in r.items() if k not in ("time", "epoch_s")} for e, r in last.items()}


def _samples(run_dir, ranks=(0, 1)):
    """{(rank, update): indices}, the last record of each update (one redone after a resume was logged twice)."""
    import json

    out = {}
    for rank in ranks:
        for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out[rank, rec["update"]] = (rec["epoch"], rec["indices"])
    return out


def _wait_for_checkpoint(checkpoints, update, proc, timeout_s=300):
    """Until the checkpoint of `update` is complete, with `proc` still running."""
    import time

    deadline = time.time() + timeout_s
    while not (checkpoints / f"update_{update:09d}" / "COMPLETE").is_file():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before update {update}"
        time.sleep(0.02)


def _remove_checkpoints_after(checkpoints, update):
    """So that run.resume=auto resumes from the checkpoint of `update`."""
    import shutil

    for path in checkpoints.iterdir():
        if path.name > f"update_{update:09d}":
            shutil.rmtree(path)


@pytest.fixture(scope="module")
def killed(data_root, tmp_path_factory):
    """A 2-process run whose rank 1 is SIGKILLed once the checkpoint of update 6 (inside epoch 2) is complete;
    it also holds the epoch-end checkpoint of update 4. Checkpoints written after 6 (if the kill landed later) are
    removed, so that each test resumes from the checkpoint it names."""
    import subprocess

    from _runs import BIN, RECIPE, REPO
    from test_faults_train import worker_pid

    out = tmp_path_factory.mktemp("killed")
    args = overrides(data_root, out, "run", **{"run.resume": "auto", "run.checkpoint_every_updates": 2,
                                                "run.keep_checkpoints": 6})
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
           "-m", "goyal_recipe.cli", "train", str(RECIPE), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "run" / "checkpoints"
    try:
        _wait_for_checkpoint(checkpoints, 6, proc)
        os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "run" / "model.safetensors").exists()
    _remove_checkpoints_after(checkpoints, 6)
    assert {p.name for p in checkpoints.iterdir()} >= {"update_000000004", "update_000000006"}
    return out / "run"


@pytest.fixture(scope="module")
def restarted(data_root, tmp_path_factory):
    """A 2-process run under `torchrun --max-restarts 1`, checkpointing every 2 updates, whose rank 1 is SIGKILLed
    once the checkpoint of update 6 (inside epoch 2) is complete; the agent restarts both workers and they resume by
    themselves. Both workers are stopped (SIGSTOP) before the kill, and any checkpoint after 6 that they reached
    in the meantime is removed, so that the restart resumes from 6. The run directory keeps the first attempt's
    checkpoints of updates 4 (an epoch end) and 6."""
    from test_faults_train import torchrun_with_restart, worker_pid

    out = tmp_path_factory.mktemp("restarted")
    args = {"run.resume": "auto", "run.checkpoint_every_updates": 2, "run.keep_checkpoints": 6,
            "run.collective_timeout_s": 60}
    checkpoints = out / "run" / "checkpoints"
    log_path = out / "restarted.log"
    try:
        with open(log_path, "w") as log:
            proc = torchrun_with_restart(overrides(data_root, out, "run", **args), log)
            try:
                _wait_for_checkpoint(checkpoints, 6, proc)
                rank1, rank0 = worker_pid(proc.pid, 1), worker_pid(proc.pid, 0)
                os.kill(rank1, signal.SIGSTOP)  # first: rank 0 then cannot finish another update's collectives
                os.kill(rank0, signal.SIGSTOP)
                _remove_checkpoints_after(checkpoints, 6)
                os.kill(rank1, signal.SIGKILL)
                os.kill(rank0, signal.SIGCONT)
                assert proc.wait(timeout=300) == 0  # restarted and finished without help
            finally:
                if proc.poll() is None:
                    proc.terminate()  # the agent stops its workers
                    proc.wait(timeout=60)
    finally:
        print(f"--- restarted:\n{log_path.read_text()[-4000:]}")  # shown by pytest if a test of it fails
    return out / "run"


def test_per_rank_state_is_checkpointed(restarted):
    """Inside an epoch each rank's BN running statistics are its own (the paper's per-worker BN), and both are
    saved; at an epoch's end they have been averaged and agree."""
    for update, averaged in ((4, True), (6, False)):
        path = restarted / "checkpoints" / f"update_{update:09d}"
        ranks = [load_file(path / f"buffers_rank{rank}.safetensors") for rank in (0, 1)]
        stats = [key for key in ranks[0] if key.endswith(("running_mean", "running_var"))]
        assert len(stats) == len(ranks[0]) == 2 * 14  # every float buffer of resnet10t's 14 BN layers
        assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in stats) == averaged, update
        sums = [UpdateSums(torch.load(path / f"rank{rank}.pt", weights_only=True)["progress"]["epoch_sums"])
                for rank in (0, 1)]
        if averaged:  # the epoch-end checkpoint starts the next epoch
            assert all(not s.tensor.any() for s in sums)
        else:  # 2 updates of epoch 2: 2 x 8 images on each rank
            assert [float(s.images) for s in sums] == [16.0, 16.0] and float(sums[0].loss_sum) != float(sums[1].loss_sum)


# Slow: at an epoch end the ranks' BN buffers are already averaged, so the mid-epoch resume (the torchrun restart
# below) is the one where per-rank state decides the result.
@pytest.mark.slow
def test_two_processes_killed_and_resumed_at_an_epoch_end_equal_uninterrupted(runs, killed, tmp_path, data_root):
    """SIGKILL of rank 1, then a new `accelerate launch` with run.resume=auto from the checkpoint at the end of
    epoch 1 (4): per-update losses, every parameter and buffer of the final weights, the epoch records and each
    rank's samples of each update equal the uninterrupted 2-process run's, bit for bit."""
    import shutil

    resume_from = 4
    run_dir = tmp_path / "run"
    shutil.copytree(killed, run_dir)
    _remove_checkpoints_after(run_dir / "checkpoints", resume_from)
    proc = train(overrides(data_root, tmp_path, "run", **{"run.resume": "auto", "run.checkpoint_every_updates": 2,
                                                          "run.keep_checkpoints": 3}), launcher="accelerate")
    assert f"at update {resume_from}" in proc.stdout
    reference = runs / "two_procs"
    assert records(run_dir, "run")[-1]["resumed_at_update"] == resume_from
    assert step_losses(run_dir) == step_losses(reference)
    resumed, uninterrupted = load_file(run_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert sum(key.endswith("running_var") for key in resumed) == 14
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    assert _by_epoch(run_dir) == _by_epoch(reference)
    assert _samples(run_dir) == _samples(reference)


@pytest.mark.slow
def test_resume_on_another_number_of_processes(killed, tmp_path, data_root):
    """The 2-process checkpoint inside epoch 2 resumed by one process: a warning says the run is no longer the
    uninterrupted one (each rank starts from the mean of the saved ranks' BN statistics), and the epoch still uses
    every sample once: the one process continues the epoch's permutation where the two stopped."""
    import json
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(killed, run_dir)  # its newest checkpoint is 6's
    proc = train(overrides(data_root, tmp_path, "run", **{"run.resume": "auto", "run.max_updates": 8}))
    assert "resuming on 1 ranks from a checkpoint of 2" in proc.stderr
    header = records(run_dir, "run")[-1]
    assert (header["resumed_at_update"], header["world_size"]) == (6, 1)
    seen = []
    for rank in (0, 1):  # updates 5 and 6 by both ranks, 7 and 8 by the one process
        last = {}
        for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["epoch"] == 1 and (rank == 0 or rec["update"] <= 6):
                last[rec["update"]] = rec["indices"]
        seen += [i for indices in last.values() for i in indices]
    assert sorted(seen) == list(range(64))
    assert records(run_dir, "epoch")[-1]["epoch"] == 2


def test_torchrun_restarts_a_killed_rank_and_finishes_the_same_run(runs, restarted):
    """SIGKILL of rank 1 inside epoch 2 under `torchrun --max-restarts 1`: the agent restarts both workers, they
    resume from the checkpoint of update 6 by themselves (rank-local BN statistics, sampler position, running sums),
    and the job ends with the uninterrupted 2-process run's per-update losses, every parameter and buffer of its
    final weights, its epoch records and each rank's samples of each update, bit for bit (accelerate launch starts
    the same torchrun workers)."""
    reference = runs / "two_procs"
    starts = records(restarted, "run")
    assert len(starts) == 2 and starts[1]["world_size"] == 2  # one restart
    assert starts[1]["resumed_at_update"] == 6
    assert step_losses(restarted) == step_losses(reference)
    resumed, uninterrupted = load_file(restarted / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert sum(key.endswith("running_var") for key in resumed) == 14
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    assert _by_epoch(restarted) == _by_epoch(reference)
    assert _samples(restarted) == _samples(reference)
    for epoch, seen in samples_by_epoch(restarted, ranks=(0, 1)).items():
        assert sorted(seen) == list(range(64)), epoch  # nothing skipped or repeated, the interrupted epoch included
