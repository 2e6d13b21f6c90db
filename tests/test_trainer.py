"""End-to-end runs of goyal-train in real processes: 1 process, and 2 processes under accelerate launch."""

import pytest
import torch
from safetensors.torch import load_file

from _runs import EPOCHS, EXPECTED_LR, UPDATES_PER_EPOCH, overrides, parameters, records, samples_by_epoch, \
    step_losses, train
from goyal_recipe import Schedule
from goyal_recipe.report import schedule_points


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """The same recipe as 2 processes x 8 images (JPEG folders), and as 1 process x 2 accumulation
    micro-batches of 8 (the same images from the parquet shards, with TensorBoard logging)."""
    out = tmp_path_factory.mktemp("runs")
    train(overrides(data_root, out, "two_procs"), launcher="accelerate")
    train(overrides(data_root, out, "one_proc", **{"data.source": "parquet", "run.trackers": "[tensorboard]"}))
    return out


def test_two_processes_lr_coverage_and_exact_validation(runs):
    run_dir = runs / "two_procs"
    schedule = Schedule(global_batch_size=16, base_lr=0.05, base_batch_size=4, warmup_epochs=1, milestones=(2,),
                        epochs=EPOCHS)
    steps = records(run_dir, "step")
    assert [r["update"] for r in steps] == list(range(1, EPOCHS * UPDATES_PER_EPOCH + 1))
    assert [r["lr"] for r in steps] == pytest.approx(EXPECTED_LR, rel=1e-12)
    for r in steps:  # the LR used by update t (0-based) is Schedule.lr(t / updates_per_epoch)
        assert r["lr"] == pytest.approx(schedule.lr((r["update"] - 1) / UPDATES_PER_EPOCH), rel=1e-12)
    header = records(run_dir, "run")[0]
    assert header["updates_per_epoch"] == UPDATES_PER_EPOCH and header["world_size"] == 2
    planned = schedule_points(run_dir, header)  # what lr.png draws, from the saved config.yaml
    assert [lr for _, lr in planned] == pytest.approx(EXPECTED_LR, rel=1e-12)
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


def test_resume_equals_uninterrupted(runs, data_root, tmp_path):
    # Interrupted after 6 updates (inside epoch 2, checkpoints every 3 updates), then resume=auto.
    same = {"data.source": "parquet", "run.resume": "auto"}
    train(overrides(data_root, tmp_path, "one_proc", **same, **{"run.max_updates": 6, "run.checkpoint_every_updates": 3}))
    assert not (tmp_path / "one_proc" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "one_proc" / "checkpoints").iterdir()) == [
        "update_000000004", "update_000000006"]  # epoch end at 4, periodic at 6; the oldest (3) pruned
    proc = train(overrides(data_root, tmp_path, "one_proc", **same))
    assert "at update 6" in proc.stdout
    assert step_losses(tmp_path / "one_proc") == pytest.approx(step_losses(runs / "one_proc"), rel=1e-6)
    resumed = load_file(tmp_path / "one_proc" / "model.safetensors")
    reference = load_file(runs / "one_proc" / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)
    epoch1 = samples_by_epoch(tmp_path / "one_proc", ranks=(0,))[1]
    assert sorted(epoch1) == list(range(64))  # no sample skipped or repeated across the interruption


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
    train(overrides(data_root, tmp_path, "bf16", **fast))
    reference = step_losses(runs / "one_proc")
    for update, loss in step_losses(tmp_path / "bf16").items():
        assert loss == pytest.approx(reference[update], rel=0.05)


@pytest.mark.parametrize("extra,message", [
    (["optim.warmpu=constant"], "unknown key optim.warmpu"),
    (["batch.global_batch_size=20"], "batch.global_batch_size=20 is not divisible"),
    (["model.bn_group_size=16"], "model.bn_group_size=16 does not divide batch.per_device_batch_size=8"),
    (["optim.milestones=[5]"], "milestones [5.0] must lie in"),
    (["model.name=resnet9000"], "model.name='resnet9000' is not a timm model"),
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


def test_quickstart_learns(tmp_path):
    """The quickstart recipe, shortened to 4 epochs, ends far below the 90 % chance error of 10 classes."""
    args = [f"run.output_dir={tmp_path}", "run.resume=none", "optim.epochs=4", "optim.warmup_epochs=1",
            "optim.milestones=[3]", f"data.root={tmp_path / 'data'}", "data.generate.train_per_class=100",
            "data.generate.val_per_class=20", "run.plots=true"]
    proc = train(args)
    last = records(tmp_path / "quickstart", "epoch")[-1]
    assert last["val_images"] == 200
    assert last["val_top1_error"] < 60, proc.stdout[-2000:]
    assert {p.name for p in (tmp_path / "quickstart" / "plots").iterdir()} >= {"error.png", "lr.png"}
