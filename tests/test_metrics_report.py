"""Tests of goyal_recipe.metrics (exact counts, JSONL, throughput, progress lines), goyal_recipe.records
(typed records, the one reader of a resumed run) and goyal_recipe.report (plots of a synthetic run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from goyal_recipe.metrics import (
    EvalCounter,
    JsonlWriter,
    ThroughputMeter,
    format_duration,
    format_epoch_line,
    format_step_line,
    read_jsonl,
    topk_correct,
)
from goyal_recipe.records import (
    EpochRecord,
    RecordError,
    RunRecord,
    SkipRecord,
    StepRecord,
    from_dict,
    read_run,
)
from goyal_recipe.report import NothingToPlotError, load_curves, plot_main, plot_overlay, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 4 samples, 6 classes, no ties. Rank of the target (1 = highest logit):
#   row 0: target 1 is the largest                      -> rank 1
#   row 1: target 0 (0.5) is below class 5 (0.6)         -> rank 2
#   row 2: target 5 is the smallest                      -> rank 6
#   row 3: target 3 (0.3) is below class 4 (0.9), 5 (0.4) -> rank 3
LOGITS = torch.tensor(
    [
        [0.1, 0.9, 0.3, 0.2, 0.05, 0.0],
        [0.5, 0.1, 0.4, 0.3, 0.2, 0.6],
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
        [0.0, 0.1, 0.2, 0.3, 0.9, 0.4],
    ]
)
TARGETS = torch.tensor([1, 0, 5, 3])


# ------------------------------------------------------------------------------- top-k counts


def test_topk_correct_hand_table():
    assert topk_correct(LOGITS, TARGETS).tolist() == [1.0, 3.0]
    # k = 10 > 6 classes is clipped to 6: every sample counts
    assert topk_correct(LOGITS, TARGETS, ks=(1, 2, 3, 5, 6, 10)).tolist() == [1, 2, 3, 3, 4, 4]
    out = topk_correct(LOGITS, TARGETS, ks=(3,))
    assert out.shape == (1,) and out.dtype == torch.float64
    # fewer classes than the default top-5: clipped
    # (argmax of the first two columns is 1, 0, 0, 1)
    assert topk_correct(LOGITS[:, :2], torch.tensor([1, 1, 0, 0])).tolist() == [2.0, 4.0]


def test_topk_correct_rejects_bad_shapes():
    with pytest.raises(ValueError, match="targets"):
        topk_correct(LOGITS, TARGETS[:3])
    with pytest.raises(ValueError, match="k must be"):
        topk_correct(LOGITS, TARGETS, ks=(0,))


def test_eval_counter_hand_table():
    counter = EvalCounter()
    counter.update(LOGITS, TARGETS, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert counter.as_tensor().tolist() == [10.0, 1.0, 3.0, 4.0]
    assert counter.summary() == {
        "val_loss": 2.5,
        "val_top1_error": 75.0,
        "val_top5_error": 25.0,
        "val_top1_acc": 25.0,
        "val_top5_acc": 75.0,
        "val_images": 4,
    }
    empty = EvalCounter().summary()
    assert empty["val_images"] == 0 and empty["val_top1_error"] is None


def test_eval_counter_ranks_sum_to_the_whole():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 10, generator=gen)
    targets = torch.randint(0, 10, (37,), generator=gen)
    loss = F.cross_entropy(logits, targets, reduction="none")

    ranks = []
    for lo, hi in ((0, 20), (20, 37)):  # uneven shards, each in two batches
        counter = EvalCounter()
        mid = (lo + hi) // 2
        for a, b in ((lo, mid), (mid, hi)):
            counter.update(logits[a:b], targets[a:b], loss[a:b])
        ranks.append(counter.as_tensor())
    total = ranks[0] + ranks[1]  # what an all-reduce sum gives
    merged = EvalCounter.from_tensor(total).summary()
    assert EvalCounter().summary(total) == merged

    whole = EvalCounter()
    whole.update(logits, targets)  # loss defaults to cross-entropy
    expected = whole.summary()

    top1 = int((logits.argmax(1) == targets).sum())
    top5 = int((logits.topk(5, 1).indices == targets[:, None]).any(1).sum())
    assert merged["val_images"] == expected["val_images"] == 37
    assert total[1].item() == top1 and total[2].item() == top5
    assert merged["val_top1_acc"] == expected["val_top1_acc"] == 100.0 * top1 / 37
    assert merged["val_top5_acc"] == expected["val_top5_acc"] == 100.0 * top5 / 37
    assert merged["val_top1_error"] == expected["val_top1_error"] == 100.0 * (37 - top1) / 37
    assert merged["val_top1_error"] == pytest.approx(100.0 - merged["val_top1_acc"], abs=1e-12)
    assert merged["val_top5_error"] == pytest.approx(100.0 - merged["val_top5_acc"], abs=1e-12)
    assert merged["val_loss"] == pytest.approx(loss.double().mean().item(), rel=1e-12)
    assert merged["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-12)


# ------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip_and_truncated_last_line(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = JsonlWriter(path)
    assert not path.exists()  # opened lazily
    writer.write({"kind": "run", "name": "t", "global_batch_size": 256})
    writer.write({"kind": "step", "update": torch.tensor(3), "loss": torch.tensor(0.5), "lr": np.float32(0.25)})
    writer.write({"kind": "epoch", "val_images": np.int64(50000), "val_loss": None})
    # each line is on disk before close
    assert len(path.read_text().splitlines()) == 3
    writer.close()

    expected = [
        {"kind": "run", "name": "t", "global_batch_size": 256},
        {"kind": "step", "update": 3, "loss": 0.5, "lr": 0.25},
        {"kind": "epoch", "val_images": 50000, "val_loss": None},
    ]
    records = read_jsonl(path)
    assert records == expected
    assert type(records[1]["loss"]) is float and type(records[1]["update"]) is int

    # a crash mid-write leaves a partial last line: skipped on read
    with open(path, "a") as f:
        f.write('{"kind": "step", "update": 4, "lo')
    assert read_jsonl(path) == expected

    # a resumed run reopens the file: the fragment is dropped, the new record has its own line
    with JsonlWriter(path) as writer:
        writer.write({"kind": "step", "update": 4})
    assert read_jsonl(path) == expected + [{"kind": "step", "update": 4}]

    # a malformed line in the middle is an error naming the file and line
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2:"):
        read_jsonl(path)


def test_jsonl_writer_disabled_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path, enabled=False)
    writer.write({"kind": "run"})
    writer.close()
    assert not path.exists()


# ------------------------------------------------------------------------------- records

# The keys of each kind, in the order the trainer has always written them (the file format).
RUN_KEYS = ["kind", "name", "global_batch_size", "updates_per_epoch", "epochs", "world_size", "resumed_at_update",
            "time"]
STEP_KEYS = ["kind", "update", "epoch", "loss", "lr", "bad_images", "images_per_s", "data_wait_s", "step_s", "time"]
NOISE_KEYS = ["noise_scale", "noise_grad_sq", "noise_trace_sigma"]
SKIP_KEYS = ["kind", "update", "epoch", "reason", "time"]
EPOCH_KEYS = ["kind", "epoch", "update", "train_loss", "train_top1_error", "train_bad_images", "skipped_updates",
              "epoch_s", "val_loss", "val_top1_error", "val_top5_error", "val_top1_acc", "val_top5_acc", "val_images",
              "lr", "time"]


def _start(resumed_at_update, t):
    return RunRecord(name="r", global_batch_size=16, updates_per_epoch=4, epochs=2, world_size=2,
                     resumed_at_update=resumed_at_update, time=t)


def _step(update, loss, **noise):
    return StepRecord(update=update, epoch=update / 4, loss=loss, lr=0.05 * update, bad_images=update % 2,
                      images_per_s=160.0, data_wait_s=0.01, step_s=0.1, time=100.0 + update, **noise)


def _epoch(epoch, train_loss, counts=None):
    summary = {**EvalCounter().summary(counts), "val_bad_images": 0} if counts is not None else {}
    return EpochRecord(epoch=epoch, update=4 * epoch, train_loss=train_loss, train_top1_error=50.0,
                       train_bad_images=1, skipped_updates=1, epoch_s=2.5, lr=0.2, time=200.0 + epoch, **summary)


def test_records_round_trip_with_the_file_format_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    counts = torch.tensor([10.0, 1.0, 3.0, 4.0], dtype=torch.float64)  # the hand table's: 75 % top-1 error
    written = [_start(0, 99.0), _step(1, 2.0), _step(2, 1.5, noise_scale=48.0, noise_grad_sq=0.5,
                                                       noise_trace_sigma=24.0),
               SkipRecord(update=3, epoch=1, time=103.0), _epoch(1, 1.75), _epoch(2, 1.25, counts)]
    with JsonlWriter(path) as log:
        for record in written:
            log.write(record)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [list(line) for line in lines] == [RUN_KEYS, STEP_KEYS, STEP_KEYS[:-1] + NOISE_KEYS + ["time"], SKIP_KEYS,
                                              EPOCH_KEYS, EPOCH_KEYS[:-2] + ["val_bad_images"] + EPOCH_KEYS[-2:]]
    assert lines[2]["noise_scale"] == 48.0 and lines[3]["reason"] == "non-finite loss or gradient"
    assert lines[4]["val_top1_error"] is None and "val_bad_images" not in lines[4]
    assert (lines[5]["val_top1_error"], lines[5]["val_top5_acc"], lines[5]["val_images"]) == (75.0, 75.0, 4)
    assert [from_dict(line) for line in lines] == written
    log = read_run(tmp_path)
    assert (log.starts, log.steps, log.skips, log.epochs) == ([written[0]], written[1:3], [written[3]], written[4:])
    assert [r.as_dict() for r in log.of_kind("step")] == lines[1:3]

    # a key this version does not know is kept and written back; one an older file lacks reads as None
    newer = {**lines[1], "update_s": 0.125}
    assert from_dict(newer).extra == {"update_s": 0.125} and from_dict(newer).as_dict() == newer
    older = from_dict({"kind": "step", "update": 5, "loss": 0.5})
    assert (older.update, older.loss, older.bad_images, older.time) == (5, 0.5, None, None)


def test_read_run_resolves_a_resumed_run_last_write_wins(tmp_path):
    """Updates 1..6 logged, update 3 skipped, checkpoint at update 4; the process dies while writing update 7.
    The restart (resumed_at_update=4) logs updates 5..8 again and epoch 1 is not repeated."""
    path = tmp_path / "run" / "metrics.jsonl"
    with JsonlWriter(path) as log:
        log.write(_start(0, 1.0))
        for update in (1, 2, 4):
            log.write(_step(update, loss=10.0 - update))
        log.write(SkipRecord(update=3, epoch=1, time=3.0))
        log.write(_epoch(1, 7.5))
        for update in (5, 6):
            log.write(_step(update, loss=100.0 + update))  # lost with the process: its weights are not kept
    with open(path, "a") as f:
        f.write('{"kind": "step", "update": 7, "epo')  # the line the kill cut
    with JsonlWriter(path) as log:  # the restart drops the cut line
        log.write(_start(4, 50.0))
        for update in (5, 6, 7, 8):
            log.write(_step(update, loss=1.0 / update))
        log.write(_epoch(2, 0.25))

    run = read_run(path.parent)
    assert [(r.resumed_at_update, r.time) for r in run.starts] == [(0, 1.0), (4, 50.0)]
    assert run.header == run.starts[0]
    assert [r.update for r in run.steps] == [1, 2, 4, 5, 6, 7, 8]
    assert [r.loss for r in run.steps] == [9.0, 8.0, 6.0, 0.2, 1 / 6, 1 / 7, 0.125]
    assert [r.update for r in run.skips] == [3]
    assert [(r.epoch, r.train_loss) for r in run.epochs] == [(1, 7.5), (2, 0.25)]
    assert read_run(path) == run  # the file itself, or its run directory

    # an epoch logged again (a restart from before its end) counts once, with the restart's values
    with JsonlWriter(path) as log:
        log.write(_epoch(2, 0.125))
    assert [(r.epoch, r.train_loss) for r in read_run(path).epochs] == [(1, 7.5), (2, 0.125)]


def test_read_run_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_start(0, 1.0).as_dict()) + "\n" + json.dumps({"kind": "stpe", "update": 1}) + "\n")
    with pytest.raises(RecordError, match=r"metrics\.jsonl:2: unknown record kind 'stpe'"):
        read_run(path)
    path.write_text('{"kind": "st\n' + json.dumps(_start(0, 1.0).as_dict()) + "\n")
    with pytest.raises(RecordError, match=r"metrics\.jsonl:1: not a JSON record .*; pass a metrics\.jsonl written"):
        read_run(path)
    path.write_text(json.dumps({"kind": "epoch", "train_loss": 1.0}) + "\n")
    with pytest.raises(RecordError, match=r"metrics\.jsonl:1: epoch record without a numeric 'epoch'"):
        read_run(tmp_path)
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match=r"bare.metrics\.jsonl not found \(.*bare is not a run directory\)"):
        read_run(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(tmp_path / "nope" / "metrics.jsonl")
    empty = read_run(tmp_path / "nope", missing_ok=True)
    assert (empty.starts, empty.steps, empty.skips, empty.epochs, empty.header) == ([], [], [], [], None)


# ------------------------------------------------------------------------------- throughput


def test_throughput_meter_fixed_durations():
    meter = ThroughputMeter(total_updates=100, window=2)
    assert meter.eta_s(0) is None and meter.images_per_s == 0.0
    meter.record(256, 4.0, 3.0)  # falls out of the window
    meter.record(256, 0.5, 0.25)
    meter.record(256, 1.5, 0.75)
    assert meter.steps == 3
    assert meter.images_per_s == 256.0  # 512 images / 2.0 s
    assert meter.mean_step_s == 1.0
    assert meter.mean_data_wait_s == 0.5
    assert meter.eta_s(10) == 90.0  # 90 updates left x 1.0 s
    assert meter.eta_s(100) == 0.0
    assert meter.eta_s(10, total_updates=20) == 10.0


def test_throughput_meter_times_the_loop():
    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

    clock = Clock()

    def loader(n):  # each batch takes 0.25 s to arrive
        for i in range(n):
            clock.t += 0.25
            yield i

    meter = ThroughputMeter(total_updates=4, window=10, clock=clock)
    results = []
    for epoch in range(2):
        for i, _ in enumerate(meter.timed(loader(4))):
            clock.t += 0.75  # forward/backward of one micro-batch
            if i % 2 == 1:  # 2 micro-batches of 32 per update
                results.append(meter.step_done(64))
        clock.t += 100.0  # evaluation between epochs is not counted
    assert results == [(2.0, 0.5)] * 4
    assert meter.images_per_s == 32.0
    assert meter.eta_s(2) == 4.0


# ------------------------------------------------------------------------------- lines


def test_format_step_line_exact_and_aligned():
    line = format_step_line(3, 90, 120, 156, 2.3456, 1.65, 8123.4, 0.012, 3723.0)
    assert line == "epoch  3/90  step 120/156  loss 2.3456  lr 1.6500  img/s  8123.4  data 0.012s  eta 1:02:03"
    other = format_step_line(10, 90, 7, 156, 6.9078, 0.1, 512.25, 1.5, 100 * 3600.0)
    assert other == "epoch 10/90  step   7/156  loss 6.9078  lr 0.1000  img/s   512.2  data 1.500s  eta 100:00:00"
    for field in ("step", "loss", "lr", "img/s", "data", "eta"):
        assert line.index(field) == other.index(field)
    assert format_step_line(1, 1, 1, 1, 0.5, 2.5e-5, 1.0, 0.0, None).endswith("lr 2.50e-05  img/s     1.0  data 0.000s  eta -:--:--")
    assert format_duration(59.6) == "0:01:00"


def test_format_epoch_line():
    record = {
        "kind": "epoch", "epoch": 3, "update": 468, "train_loss": 2.5, "train_top1_error": 55.125,
        "val_loss": 2.0, "val_top1_error": 45.5, "val_top5_error": 21.0, "val_top1_acc": 54.5,
        "val_top5_acc": 79.0, "val_images": 50000, "lr": 0.1, "epoch_s": 1234.5, "time": 0.0,
    }
    assert format_epoch_line(record, epochs=90) == (
        "epoch  3/90 done  train loss 2.5000  train top-1 err 55.12%  val loss 2.0000  "
        "val top-1 err 45.50% (acc 54.50%)  top-5 err 21.00% (acc 79.00%)  on 50000 images  time 0:20:34"
    )
    no_val = {**record, "val_loss": None, "val_top1_error": None, "val_top5_error": None}
    assert format_epoch_line(no_val) == "epoch 3 done  train loss 2.5000  train top-1 err 55.12%  val n/a  time 0:20:34"


# ------------------------------------------------------------------------------- plots


def _lr(epoch: float, peak: float) -> float:
    """Gradual warmup from 0.1 over 5 epochs, then x0.1 at epochs 8 and 10."""
    if epoch < 5:
        return 0.1 + (peak - 0.1) * epoch / 5
    return peak * 0.1 ** sum(epoch >= m for m in (8, 10))


def _write_run(run_dir, name, kn, epochs=12, updates_per_epoch=4, val=True):
    """A synthetic run; returns the (epoch, lr) points of its step records."""
    peak = 0.1 * kn / 256
    points = []
    with JsonlWriter(run_dir / "metrics.jsonl") as log:
        log.write({"kind": "run", "name": name, "global_batch_size": kn,
                   "updates_per_epoch": updates_per_epoch, "epochs": epochs, "time": 0.0})
        for update in range(1, epochs * updates_per_epoch + 1):
            lr = _lr((update - 1) / updates_per_epoch, peak)
            epoch = update / updates_per_epoch
            points.append((epoch, lr))
            log.write({"kind": "step", "update": update, "epoch": epoch, "loss": 7.0 / (1 + epoch),
                       "lr": lr, "images_per_s": 100.0, "data_wait_s": 0.0, "step_s": kn / 100.0,
                       "time": float(update)})
            if update % updates_per_epoch == 0:
                e = update // updates_per_epoch
                log.write({"kind": "epoch", "epoch": e, "update": update, "train_loss": 7.0 / (1 + e),
                           "train_top1_error": 90.0 - 4 * e,
                           "val_loss": 6.0 / (1 + e) if val else None,
                           "val_top1_error": 85.0 - 4 * e if val else None,
                           "val_top5_error": 60.0 - 4 * e if val else None,
                           "val_top1_acc": 15.0 + 4 * e if val else None,
                           "val_top5_acc": 40.0 + 4 * e if val else None,
                           "val_images": 100 if val else None, "lr": lr, "epoch_s": 1.0, "time": 0.0})
    return points


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE


def test_load_curves_exact_points(tmp_path):
    run = tmp_path / "kn8k"
    points = _write_run(run, "kn8k", 8192)
    curves = load_curves(run)
    assert curves.lr == points
    assert curves.lr[0] == (0.25, 0.1)  # warmup starts at the kn=256 LR
    assert curves.lr[19] == (5.0, pytest.approx(3.045))  # last warmup update, used at 4.75 epochs
    assert curves.lr[20] == (5.25, 3.2)  # peak 0.1 x 8192/256
    assert curves.lr[32][1] == pytest.approx(0.32) and curves.lr[40][1] == pytest.approx(0.032)
    assert curves.train_error == [(float(e), 90.0 - 4 * e) for e in range(1, 13)]
    assert curves.val_error == [(float(e), 85.0 - 4 * e) for e in range(1, 13)]
    assert curves.label == "kn8k (kn=8192)"

    # a resumed run logs update 48 again: the last record wins, no duplicate point
    with JsonlWriter(run / "metrics.jsonl") as log:
        log.write({"kind": "step", "update": 48, "epoch": 12.0, "loss": 0.5, "lr": 0.5})
    assert load_curves(run).lr == points[:-1] + [(12.0, 0.5)]


def test_plot_run_and_overlay(tmp_path):
    small, large = tmp_path / "kn256", tmp_path / "kn8k"
    _write_run(small, "kn256", 256)
    _write_run(large, "kn8k", 8192, val=False)

    paths = plot_run(small)
    assert [p.name for p in paths] == ["error.png", "lr.png", "loss.png"]
    assert all(p.parent == small / "plots" for p in paths)
    for p in paths:
        _assert_png(p)

    # no validation records: the error plot has the training curve only
    assert load_curves(large).val_error == []
    for p in plot_run(large):
        _assert_png(p)

    out = plot_overlay([small, large], tmp_path / "cmp" / "overlay.png")
    assert out == tmp_path / "cmp" / "overlay.png"
    _assert_png(out)


def test_nothing_to_plot_names_the_file(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(NothingToPlotError, match="empty.metrics.jsonl"):
        plot_run(run)
    # a header and a step record cut by a crash: still nothing to plot
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "run", "name": "x"}) + '\n{"kind": "st')
    with pytest.raises(NothingToPlotError, match="no step or epoch records"):
        plot_run(run)


def test_plot_main(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert plot_main([str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("goyal-plot: error:") and str(missing) in captured.err

    bare = tmp_path / "bare"
    bare.mkdir()
    assert plot_main([str(bare)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err

    # a line the reader does not know: one line naming the file and line, no traceback
    (bare / "metrics.jsonl").write_text(json.dumps({"kind": "run", "name": "x"}) + "\n" + json.dumps({"kind": "stp"}))
    assert plot_main([str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:2: unknown record kind 'stp'" in err

    a, b = tmp_path / "a", tmp_path / "b"
    _write_run(a, "a", 256)
    _write_run(b, "b", 8192)
    assert plot_main([str(a)]) == 0
    assert capsys.readouterr().out.split() == [str(a / "plots" / n) for n in ("error.png", "lr.png", "loss.png")]
    assert plot_main([str(a), str(b)]) == 0
    assert capsys.readouterr().out.split() == [str(a / "plots" / "overlay.png")]
    _assert_png(a / "plots" / "overlay.png")
    out = tmp_path / "o.png"
    assert plot_main([str(a), str(b), "--out", str(out), "--label", "256", "--label", "8k"]) == 0
    _assert_png(out)
