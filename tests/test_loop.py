"""The loop's rules, run by the real Trainer inside the test process (engine=local): LR per update, logging and
checkpoint cadence, epoch records, run.max_updates, exact resume, non-finite updates skipped or stopping the run,
checkpoints refused or ignored. What needs several processes or a kill is in test_trainer.py and
test_faults_train.py."""

import ast
import importlib.util
import inspect
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

from _loop import local_args, main_local, run_local
from _runs import BUFFERS, EXPECTED_LR, RECIPE, REPO, UPDATES_PER_EPOCH, assert_lr_table, assert_same_run, \
    records, samples_by_epoch, step_losses
from goyal_recipe.config import load_config
from goyal_recipe.data.reader import SampleReader
from goyal_recipe.engines.base import Engine, LaunchError
from goyal_recipe.engines.local import LocalEngine
from goyal_recipe.progress import UpdateSums, checkpoint_due
from goyal_recipe.trainer import Trainer

U = UPDATES_PER_EPOCH


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """One uninterrupted run of 3 epochs x 4 updates, a step record per update, a checkpoint every 2 updates
    (all 6 kept)."""
    return run_local(data_root, tmp_path_factory.mktemp("reference"), "run",
                     **{"run.checkpoint_every_updates": 2, "run.keep_checkpoints": 6})


def test_lr_per_update_epoch_records_and_checkpoint_cadence(reference):
    assert_lr_table(reference, world_size=1)
    epochs = records(reference, "epoch")
    assert [(r["epoch"], r["update"], r["val_images"], r["skipped_updates"]) for r in epochs] == [
        (1, 4, 20, 0), (2, 8, 20, 0), (3, 12, 20, 0)]
    losses = step_losses(reference)
    for r in epochs:  # the epoch's train loss is the mean over its updates of 16 images each
        updates = range(r["update"] - U + 1, r["update"] + 1)
        assert r["train_loss"] == pytest.approx(sum(losses[u] for u in updates) / U, rel=1e-12)
        assert r["lr"] == pytest.approx(EXPECTED_LR[r["update"] - 1], rel=1e-12)
    for epoch, seen in samples_by_epoch(reference, ranks=(0,)).items():
        assert sorted(seen) == list(range(64)), epoch  # each sample exactly once per epoch
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == [
        f"update_{n:09d}" for n in (2, 4, 6, 8, 10, 12)]
    assert (reference / "model.safetensors").is_file()


def test_max_updates_and_logging_cadence(reference, data_root, tmp_path):
    """Stopped by run.max_updates=6 inside epoch 2, a step record every 3 updates: records at 3, at the epoch's
    end (4) and at the stop (6), each the mean loss of its window; checkpoints at the epoch's end and the stop
    only (the newest 2 kept); no exported weights."""
    run_dir = run_local(data_root, tmp_path, "run", **{"run.max_updates": 6, "run.log_every_updates": 3})
    losses, full = step_losses(run_dir), step_losses(reference)
    assert sorted(losses) == [3, 4, 6]
    for update, window in ((3, (1, 2, 3)), (4, (4,)), (6, (5, 6))):
        assert losses[update] == pytest.approx(sum(full[u] for u in window) / len(window), rel=1e-12)
    assert [r["lr"] for r in records(run_dir, "step")] == pytest.approx([EXPECTED_LR[i] for i in (2, 3, 5)])
    assert [r["epoch"] for r in records(run_dir, "epoch")] == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["update_000000004", "update_000000006"]
    assert not (run_dir / "model.safetensors").exists()


@pytest.mark.parametrize("resume_from", [6, 4], ids=["mid-epoch", "epoch-end"])
def test_resume_equals_uninterrupted(reference, data_root, tmp_path, resume_from):
    """A run stopped at update 6 (checkpoints every 3: 3 pruned, 4 at the epoch's end, 6 at the stop), resumed
    with run.resume=auto from 6, or from 4 once 6 is deleted: the uninterrupted run, bit for bit."""
    same = {"run.resume": "auto", "run.checkpoint_every_updates": 3}
    run_dir = run_local(data_root, tmp_path, "run", **same, **{"run.max_updates": 6})
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["update_000000004", "update_000000006"]
    if resume_from == 4:
        shutil.rmtree(run_dir / "checkpoints" / "update_000000006")
    run_local(data_root, tmp_path, "run", **same)
    assert [r["resumed_at_update"] for r in records(run_dir, "run")] == [0, resume_from]
    assert_same_run(run_dir, reference)


def test_next_epochs_batches_are_built_while_an_epoch_ends(reference, data_root, tmp_path, monkeypatch):
    """With a loader worker, the next epoch's first samples are read while the epoch ends (here while it is
    evaluated), before its first update asks for them; after the last epoch the sampler is not moved on. The run is
    the uninterrupted one without workers, bit for bit."""
    reads = tmp_path / "reads.txt"  # the epoch of each training sample the worker reads, a line each
    read, evaluate, at_evaluation = SampleReader.__getitem__, Trainer.evaluate, []

    def logged_read(self, key):
        if self.seed is not None:
            with open(reads, "a") as f:
                f.write(f"{key[0]}\n")
        return read(self, key)

    def epochs_read():
        return set(reads.read_text().split()) if reads.exists() else set()

    def waiting_evaluate(self):
        next_epoch = str(self.update // U)
        deadline = time.monotonic() + (30 if self.update < self.stop_at else 0)
        while next_epoch not in epochs_read() and time.monotonic() < deadline:
            time.sleep(0.02)
        at_evaluation.append((self.update, self.data.train_sampler.epoch, next_epoch in epochs_read()))
        return evaluate(self)

    monkeypatch.setattr(SampleReader, "__getitem__", logged_read)
    monkeypatch.setattr(Trainer, "evaluate", waiting_evaluate)
    run_dir = run_local(data_root, tmp_path, "run", **{"data.workers": 1})
    assert at_evaluation == [(4, 1, True), (8, 2, True), (12, 2, False)]
    assert epochs_read() == {"0", "1", "2"}
    assert_same_run(run_dir, reference)


def test_nonfinite_updates_are_skipped(data_root, tmp_path):
    """The loss is NaN at updates 3, 6 and 7: those updates are dropped, and a dropped update leaves the model as
    it was, BN running statistics included (its forward moved them): the state saved after it is the state saved
    before it, to the bit. The schedule advances only with applied updates."""
    run_dir = run_local(data_root, tmp_path, "nan", **{"debug.inject_nonfinite_updates": "[3,6,7]",
                                                       "run.checkpoint_every_updates": 1, "run.keep_checkpoints": 12})
    state = {n: load_file(run_dir / "checkpoints" / f"update_{n:09d}" / "model.safetensors") for n in (1, 2, 3, 5, 6, 7)}
    bn = [key for key in state[1] if key.endswith(BUFFERS)]
    assert len(bn) == 3 * 14  # resnet10t: 14 BN layers, running_mean / running_var / num_batches_tracked
    assert not any(torch.equal(state[1][key], state[2][key]) for key in bn)  # an applied update moves them all
    for before, after in ((2, 3), (5, 6), (5, 7)):  # inside one epoch each (no buffer averaging between)
        for key, value in state[before].items():
            assert torch.equal(state[after][key], value), (before, after, key)
    assert [(r["update"], r["epoch"]) for r in records(run_dir, "skip")] == [(3, 1), (6, 2), (7, 2)]
    steps = records(run_dir, "step")
    assert [r["update"] for r in steps] == [1, 2, 4, 5, 8, 9, 10, 11, 12]
    assert [r["lr"] for r in steps] == pytest.approx(EXPECTED_LR[:9], rel=1e-12)
    assert [r["skipped_updates"] for r in records(run_dir, "epoch")] == [1, 3, 3]
    trainer_state = torch.load(run_dir / "checkpoints" / "update_000000012" / "trainer.pt", weights_only=True)
    assert trainer_state["scheduler"]["updates_done"] == 9
    assert trainer_state["progress"]["skipped_updates"] == 3


def test_too_many_nonfinite_updates_stop_with_the_weights_from_before(data_root, tmp_path, capsys):
    code = main_local(data_root, tmp_path, "nan", **{"debug.inject_nonfinite_updates": "[5,6,7,8]",
                                                     "run.max_consecutive_nonfinite": 3})
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("goyal-train: error: 4 updates in a row had a non-finite loss or gradient (from update 5); the weights "
            "of update 4 are saved in checkpoint update_000000008") in err
    before, after = (tmp_path / "nan" / "checkpoints" / f"update_00000000{n}" for n in (4, 8))
    assert (after / "COMPLETE").is_file()
    weights_before, weights_after = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    for key, value in weights_before.items():  # BN running statistics too
        assert torch.equal(value, weights_after[key]), key  # no skipped update touched the model
    momentum = [torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (before, after)]
    assert momentum[0].keys() == momentum[1].keys() and len(momentum[0]) == 44
    for index, state in momentum[0].items():
        assert torch.equal(state["momentum_buffer"], momentum[1][index]["momentum_buffer"])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_checkpoint_is_never_executed(reference, data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    marker = tmp_path / "code-ran"
    with open(newest / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    assert main_local(data_root, tmp_path, "run", **{"run.resume": "auto"}) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "refused: resume only from checkpoints this project wrote" in err
    assert not marker.exists()


def test_interrupted_checkpoint_writes_are_ignored(reference, data_root, tmp_path, caplog):
    """A kill during a checkpoint write leaves a temporary or marker-less directory: resume skips it."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "update_000000006", run_dir / "checkpoints" / "update_000000006")
    partial = run_dir / "checkpoints" / "update_000000008"
    shutil.copytree(run_dir / "checkpoints" / "update_000000006", partial)
    (partial / "COMPLETE").unlink()
    (partial / "model.safetensors").write_bytes(b"truncated")
    (run_dir / "checkpoints" / ".tmp-update_000000010").mkdir()
    for name in ("metrics.jsonl", "samples_rank0.jsonl"):  # what the interrupted run had written
        shutil.copy(reference / name, run_dir / name)
    run_local(data_root, tmp_path, "run", **{"run.resume": "auto", "run.checkpoint_every_updates": 2})
    assert "ignoring incomplete checkpoint" in caplog.text
    assert records(run_dir, "run")[-1]["resumed_at_update"] == 6
    assert_same_run(run_dir, reference)


def test_a_checkpoint_missing_its_rank_file_is_refused(reference, data_root, tmp_path, capsys):
    """A complete checkpoint of the same world size whose rank file is gone: one line naming it, no traceback."""
    checkpoint = tmp_path / "run" / "checkpoints" / "update_000000006"
    shutil.copytree(reference / "checkpoints" / "update_000000006", checkpoint)
    (checkpoint / "rank0.pt").unlink()
    assert main_local(data_root, tmp_path, "run", **{"run.resume": "auto"}) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lacks rank0.pt, written by every one of its 1 ranks" in err


def test_sigkill_at_a_random_update_then_resume(reference, data_root, tmp_path):
    """The run as its own process (engine=local), SIGKILLed at a random update, then resumed: the same run."""
    from test_faults_train import wait_for_update

    kill_at = random.Random(4).randint(3, 10)
    args = local_args(data_root, tmp_path, "run", **{"run.resume": "auto", "run.checkpoint_every_updates": 2})
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "goyal_recipe.cli", "train", str(RECIPE), *args], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_update(tmp_path / "run", kill_at, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    run_local(data_root, tmp_path, "run", **{"run.resume": "auto", "run.checkpoint_every_updates": 2})
    assert_same_run(tmp_path / "run", reference)


@pytest.mark.parametrize("every,stop_at,due", [
    (0, 12, [4, 8, 12]),  # epoch ends only
    (3, 12, [3, 4, 6, 8, 9, 12]),  # and every 3 inside epochs, once where both fall
    (0, 6, [4, 6]),  # and where run.max_updates stops the run
    (2, 7, [2, 4, 6, 7]),
])
def test_checkpoint_due(every, stop_at, due):
    assert [u for u in range(1, stop_at + 1) if checkpoint_due(u, U, every, stop_at)] == due


def test_update_sums_name_their_fields():
    sums = UpdateSums.zeros()
    sums.add_micro_batch(torch.tensor(6.0), torch.tensor(3))
    sums.add_micro_batch(torch.tensor(2.0), torch.tensor(1))
    sums.set_counts(images=16, bad_images=1)
    assert [float(getattr(sums, name)) for name in UpdateSums.FIELDS] == [8.0, 4.0, 16.0, 1.0]
    assert (sums.mean_loss(), sums.top1_error_pct()) == (0.5, 75.0)


def test_every_engine_implements_the_whole_contract():
    """No engine leaves a member of the declared contract out (it could not be built), and the local engine
    refuses a launch of several processes."""
    engines = [LocalEngine]
    from goyal_recipe.engines.accelerate import AccelerateEngine

    engines.append(AccelerateEngine)
    if importlib.util.find_spec("deepspeed") is not None:
        from goyal_recipe.engines.deepspeed import DeepSpeedEngine

        engines.append(DeepSpeedEngine)
    abstract = {name for name, member in vars(Engine).items() if getattr(member, "__isabstractmethod__", False)}
    assert {"finish_update", "backward", "prepare", "all_reduce_sum", "save_state", "device"} <= abstract
    for engine in engines:
        assert not inspect.isabstract(engine), (engine, engine.__abstractmethods__)
        assert engine.name in ("local", "accelerate", "deepspeed")


def test_local_engine_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="engine=local runs one process, but the launcher started 2"):
        LocalEngine(load_config(RECIPE))


def test_checkpoint_and_engine_modules_do_not_import_each_other():
    package = Path(__file__).parents[1] / "goyal_recipe"

    def imports(path):
        tree = ast.parse(path.read_text())
        return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}

    assert not any("engines" in m for m in imports(package / "checkpoint.py"))
    assert not any(m.endswith("checkpoint") for m in imports(package / "engines" / "accelerate.py"))
    assert not any(m.endswith("checkpoint") for m in imports(package / "engines" / "deepspeed.py"))
