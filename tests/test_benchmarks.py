"""The benchmark scripts run (--quick, CPU), print their table and append a well-formed JSON record.

These are smoke tests of the scripts, not timed tests: no figure is compared with a target.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
BENCH = REPO / "benchmarks"

# script -> (variants the record must hold, extra flags). Generated JPEGs are stored small (the figures are
# not looked at); bench_data's --repeats 1 checks that an explicit flag beats --quick's 2; bench_step's
# baseline is the trainer of the last commit, imported beside the working tree's.
SCRIPTS = {
    "bench_step": (("trainer", "reference", "baseline"), ["--baseline-commit", "HEAD"]),
    "bench_data": (("trainer", "reference"), ["--data-dir", "{tmp}/jpeg", "--source-size", "96x72", "--repeats", "1"]),
    "bench_recipe_overhead": (("baseline", "goyal_lr", "ghost_bn", "global_loss", "all", "bn_layers_plain",
                               "ghost_bn_layers_per_group", "ghost_bn_layers_packed", "sampler"),
                              []),
    "bench_train": (("goyal_train",), ["--data-dir", "{tmp}/jpeg", "--source-size", "96x72"]),
}
SUMMARY_KEYS = {"median", "min", "max", "q1", "q3", "n", "values"}
EARLIER = '{"benchmark": "earlier run"}'


def start_script(name, directory, *extra):
    """Start `name --quick` on the CPU, its results file already holding an earlier record; returns
    (process, results path)."""
    directory.mkdir(parents=True, exist_ok=True)
    results = directory / f"{name}.jsonl"
    results.write_text(EARLIER + "\n")
    flags = [f.format(tmp=directory) for f in SCRIPTS[name][1]]
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--device", "cpu", "--threads", "1",
           "--results", str(results), *flags, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), results


def finish_script(proc):
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Every script once (--quick, CPU), run side by side to keep the module short."""
    tmp = tmp_path_factory.mktemp("bench")
    started = {name: start_script(name, tmp / name) for name in SCRIPTS}
    finished = {key: (finish_script(proc), results) for key, (proc, results) in started.items()}
    for key, ((code, stdout, stderr), _) in finished.items():
        assert code == 0, f"{key}: exit {code}\n" + stdout[-3000:] + stderr[-3000:]
    return {key: (stdout, results) for key, ((_, stdout, _), results) in finished.items()}


def check_summary(metric, stats, repeats):
    assert SUMMARY_KEYS <= set(stats), (metric, stats)
    assert stats["n"] == repeats == len(stats["values"])
    assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
    for value in stats["values"]:
        assert math.isfinite(value)
        if metric.startswith("overhead"):  # a difference of two timings: may be negative (noise)
            continue
        if metric.startswith("data_wait"):
            assert value >= 0, (metric, value)
        else:
            assert value > 0, (metric, value)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_prints_table_and_appends_record(name, quick_runs):
    out, results = quick_runs[name]
    assert "median [min, max]" in out and "record appended to" in out
    for variant in SCRIPTS[name][0]:
        assert variant.split("_")[0] in out

    lines = results.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == EARLIER  # appended after what the file held
    record = json.loads(lines[1])
    assert record["benchmark"] == name
    assert {"benchmark", "date", "machine", "versions", "settings", "variants", "derived"} <= set(record)
    assert record["date"].endswith("+00:00")
    assert {"cpu", "cores", "gpu"} <= set(record["machine"]) and record["machine"]["cores"] > 0
    assert {"torch", "cuda", "timm"} <= set(record["versions"])
    settings = record["settings"]
    # --quick sets 2 repeats; bench_data's explicit --repeats 1 wins over it
    assert settings["quick"] is True and settings["device"] == "cpu"
    assert settings["repeats"] == (1 if "--repeats" in SCRIPTS[name][1] else 2)
    assert set(SCRIPTS[name][0]) <= set(record["variants"])
    for variant in record["variants"].values():
        for metric, stats in variant.items():
            if isinstance(stats, dict):
                check_summary(metric, stats, settings["repeats"])


def test_per_update_times_recovered_from_window_means():
    """bench_train inverts the trainer's sliding-window means back to per-update times."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_train import per_update
    finally:
        sys.path.remove(str(BENCH))
    from goyal_recipe.metrics import ThroughputMeter

    window = 3
    steps = [0.5, 0.1, 0.3, 0.2, 0.9, 0.4, 0.25, 0.7]
    waits = [0.05, 0.0, 0.1, 0.02, 0.3, 0.0, 0.01, 0.2]
    meter, step_means, wait_means = ThroughputMeter(window=window), [], []
    for s, w in zip(steps, waits):
        meter.record(10, s, w)
        step_means.append(meter.mean_step_s)
        wait_means.append(meter.mean_data_wait_s)
    assert per_update(step_means, window) == pytest.approx(steps)
    assert per_update(wait_means, window) == pytest.approx(waits)


def test_step_series_reads_the_run_through_the_records_reader(tmp_path):
    """A resumed run's repeated step record counts once; a missing update is refused."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_train import step_series
    finally:
        sys.path.remove(str(BENCH))
    from goyal_recipe.metrics import JsonlWriter
    from goyal_recipe.records import StepRecord

    def step(update, step_s):
        return StepRecord(update=update, epoch=update / 4, loss=1.0, lr=0.1, bad_images=0, images_per_s=1.0,
                          data_wait_s=step_s / 10, step_s=step_s)

    path = tmp_path / "metrics.jsonl"
    with JsonlWriter(path) as log:  # window 2: logged means 0.5, (0.5 + 0.25) / 2, (0.25 + 1.0) / 2
        for update, mean in ((1, 0.5), (2, 0.375), (2, 0.375), (3, 0.625)):
            log.write(step(update, mean))
    times, waits, records = step_series(path, window=2)
    assert times == pytest.approx([0.5, 0.25, 1.0]) and waits == pytest.approx([0.05, 0.025, 0.1])
    assert [r.update for r in records] == [1, 2, 3]
    with JsonlWriter(path) as log:
        log.write(step(5, 1.0))
    with pytest.raises(SystemExit, match="every update 1..N"):
        step_series(path, window=2)


@pytest.mark.gpu
def test_step_on_cuda_reports_mfu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    results = tmp_path / "bench_step.jsonl"
    cmd = [sys.executable, str(BENCH / "bench_step.py"), "--quick", "--device", "cuda", "--precision", "bf16",
           "--memory-format", "channels_last", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(results.read_text())
    assert record["machine"]["gpu"]["name"] and record["derived"]["peak_tflops"] > 0
    assert all(0 < record["variants"][v]["mfu"] for v in ("trainer", "reference"))


def _vs_timm():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_vs_timm
    finally:
        sys.path.remove(str(BENCH))
    return bench_vs_timm


@pytest.mark.slow  # a whole goyal-train process; the flags and the log parsing are checked fast below
@pytest.mark.parametrize("side_by_side", [False, True], ids=["alternating", "side-by-side"])
def test_vs_timm_goyal_side_runs_and_records(tmp_path, side_by_side):
    """bench_vs_timm --quick --goyal-only: one tiny goyal-train run, measured from its own metrics and log; with
    --side-by-side, pinned to the first half of the cores."""
    results = tmp_path / "vs.jsonl"
    cmd = [sys.executable, str(BENCH / "bench_vs_timm.py"), "--quick", "--goyal-only", "--repeats", "1",
           "--device", "cpu", "--data-dir", str(tmp_path / "data"), "--results", str(results)]
    proc = subprocess.run(cmd + ["--side-by-side"] * side_by_side, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first_half = sorted(os.sched_getaffinity(0))[:len(os.sched_getaffinity(0)) // 2]
    assert ("[goyal_train] (cpus " + ",".join(map(str, first_half)) + ")" in proc.stderr) == side_by_side
    assert "median [min, max]" in proc.stdout and "record appended to" in proc.stdout
    record = json.loads(results.read_text())
    assert record["benchmark"] == "bench_vs_timm" and set(record["variants"]) == {"goyal_train"}
    goyal = record["variants"]["goyal_train"]
    for metric in ("img_per_s", "wall_s", "startup_s", "end_s", "peak_rss_main_mib", "peak_rss_tree_mib"):
        check_summary(metric, goyal[metric], 1)
    # the main process and its one loader worker; the tree holds more than the main process alone
    assert goyal["processes"]["median"] >= 2
    assert goyal["peak_rss_tree_mib"]["median"] > goyal["peak_rss_main_mib"]["median"] > 100
    assert goyal["startup_s"]["median"] + goyal["end_s"]["median"] < goyal["wall_s"]["median"]
    assert 0 <= goyal["data_wait_pct"]["median"] < 100 and 0 <= goyal["val_top1_error"]["median"] <= 100
    # the window (updates 3-6 of 4 per epoch) holds one epoch's first update, update 5
    assert 0 <= goyal["epoch_start_wait_pct"]["median"] <= goyal["data_wait_pct"]["median"]
    assert goyal["epoch_start_wait_s"]["median"] >= 0
    assert record["derived"]["window_updates"] == [3, 6] and record["derived"]["global_batch_size"] == 16
    command = record["settings"]["commands"]["goyal_train"]
    assert "run.log_every_updates=1" in command and "data.root=<data>" in command
    assert not any(str(tmp_path) in part or str(REPO) in part for part in command)


def test_vs_timm_flags_follow_the_quickstart_recipe(tmp_path):
    """timm's flags for the cpu preset: the quickstart's batch chain, LR per update, crop and epochs."""
    vs = _vs_timm()
    fake_train = tmp_path / "train.py"
    fake_train.write_text("")
    data = tmp_path / "data"
    for split in ("train", "val"):
        for synset in ("n01", "n02", "n03"):
            (data / split / synset).mkdir(parents=True)
    args = vs.parse(["--timm-train", str(fake_train), "--dry-run", "--device", "cpu"])
    cfg = vs.recipe_config(args, data)
    cmd = vs.timm_command(args, cfg, data, tmp_path / "runs")
    assert cmd[1] == str(fake_train)

    def value(flag, count=1):
        i = cmd.index(flag)
        return cmd[i + 1:i + 1 + count]

    assert value("--data-dir") == [str(data)]
    assert value("--train-split") == ["train"] and value("--val-split") == ["val"]
    assert value("--model") == ["resnet18"] and value("--num-classes") == ["3"]
    assert value("--input-size", 3) == ["3", "48", "48"]
    assert value("--batch-size") == ["64"] and value("--grad-accum-steps") == ["2"] and value("--workers") == ["2"]
    # eta = 0.1 x 128 / 32, gradual warmup from 0.1 over 2 epochs, x0.1 at epochs 6 and 8 of 9, per update
    assert float(value("--lr")[0]) == 0.4 and float(value("--warmup-lr")[0]) == 0.1
    assert value("--warmup-epochs") == ["2"] and value("--decay-milestones", 2) == ["6", "8"]
    assert value("--epochs") == ["9"] and "--sched-on-updates" in cmd and value("--sched") == ["multistep"]
    assert value("--opt") == ["sgd"] and value("--momentum") == ["0.9"] and value("--weight-decay") == ["0.0001"]
    assert value("--scale", 2) == ["0.25", "1.0"] and value("--smoothing") == ["0.0"]
    assert value("--color-jitter") == ["0.0"] and value("--log-interval") == ["1"]
    assert "--amp" not in cmd and "--channels-last" not in cmd


def test_vs_timm_reads_update_times_and_data_waits_from_timm_lines():
    """timm prints each update's time and the epoch's running mean of accumulation x micro-batch wait."""
    vs = _vs_timm()
    accum, updates_per_epoch = 2, 3
    update_s = [0.61, 0.58, 0.7, 0.66, 0.6, 0.59]
    micro_waits = [0.02, 0.001, 0.3, 0.0, 0.012, 0.004, 0.5, 0.02, 0.0, 0.0, 0.031, 0.009]
    lines, total, count = [], 0.0, 0
    for u, seconds in enumerate(update_s):
        epoch, index = divmod(u, updates_per_epoch)
        if index == 0:
            total, count = 0.0, 0  # timm's meters are made anew each epoch
        for w in micro_waits[accum * u:accum * (u + 1)]:
            total, count = total + accum * w, count + 1
        lines.append((u, f"Train: {epoch} [{index:>4d}/{updates_per_epoch} (50%)]  Loss: 2.30 (2.31)  "
                         f"Time: {seconds:.3f}s,  209.84/s  (0.610s,  209.84/s)  LR: 1.000e-01  "
                         f"Data: {accum * w:.3f} ({total / count:.3f})"))
    lines.insert(3, (3.5, "Test: [   0/7]  Time: 0.100 (0.100)  Loss:   0.300 ( 0.300)  Acc@1:  90.000 ( 90.000)"))
    times, waits, firsts = vs.timm_series(lines)
    assert times == update_s
    assert firsts == [True, False, False, True, False, False]
    expected = [sum(micro_waits[accum * u:accum * (u + 1)]) for u in range(len(update_s))]
    # the running mean is printed to 1 ms: each cumulative sum is within (i + 1) x 0.0005 s
    assert waits == pytest.approx(expected, abs=2 * updates_per_epoch * 0.0005)
    assert sum(waits[3:]) == pytest.approx(sum(expected[3:]), abs=updates_per_epoch * 0.0005)


def test_bench_step_baseline_is_the_commits_own_package(tmp_path):
    """--baseline-commit imports the commit's goyal_recipe under another name: every module of it comes from the
    archive, none from the working tree's package."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_step import package_at_commit
    finally:
        sys.path.remove(str(BENCH))
    import importlib

    name = package_at_commit("HEAD", str(tmp_path), name="goyal_recipe_at_head")
    try:
        step = importlib.import_module(f"{name}.step")
        loaded = {m: sys.modules[m] for m in list(sys.modules) if m == name or m.startswith(name + ".")}
        assert Path(step.__file__).is_relative_to(tmp_path) and len(loaded) > 10
        assert all(Path(m.__file__).is_relative_to(tmp_path) for m in loaded.values())
        assert step.TrainStep is not importlib.import_module("goyal_recipe.step").TrainStep
    finally:
        sys.path.remove(str(tmp_path / "baseline"))
        for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[m]
