"""goyal-replicate builds the paper's runs from one base recipe and reports them from recorded metrics."""

import json
import math

import pytest

from goyal_recipe.config import load_config, plan_batches
from goyal_recipe.metrics import JsonlWriter
from goyal_recipe.replicate import (BASE_RECIPE, MODES, Setting, build_runs, collect, main, paper_kn_at,
                                    train_command, write_report)
from goyal_recipe.replicate.runner import training_order


def configs(mode, tmp_path):
    return {run.name: run.config for run in build_runs(mode, tmp_path)}


def test_quick_mode_runs_the_paper_design_at_its_scale(tmp_path):
    cfgs = configs("quick", tmp_path)
    # Table 1 (baseline, 3 warmups at kn=128), the kn sweep adds 512, two LR-scaling ablations; 3 seeds each.
    assert sorted({name.rsplit("-seed", 1)[0] for name in cfgs}) == [
        "kn128-constant-linear-zerogamma", "kn128-gradual-linear-zerogamma", "kn128-gradual-none-zerogamma",
        "kn128-gradual-sqrt-zerogamma", "kn128-none-linear-zerogamma", "kn32-gradual-linear-zerogamma",
        "kn512-gradual-linear-zerogamma"]
    assert len(cfgs) == 21
    for name, cfg in cfgs.items():
        # What the paper holds fixed: BN statistics over 32 images, the optimizer, the data, the schedule shape.
        assert (cfg.model.bn, cfg.model.bn_group_size, cfg.model.name) == ("ghost", 32, "resnet18")
        assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.base_lr, cfg.optim.base_batch_size) == (
            0.9, 1e-4, 0.1, 32)
        assert (cfg.optim.epochs, cfg.optim.milestones, cfg.optim.warmup_epochs) == (9, [3, 6, 8], 0.5)
        assert cfg.data.generate.train_per_class == 40 and cfg.data.root.endswith("replication-quick")
        assert cfg.run.seed == int(name[-1]) and cfg.run.name == name and cfg.run.eval_every_epochs == 3
    peak = {name.rsplit("-seed", 1)[0]: cfg.schedule().peak_lr for name, cfg in cfgs.items()}
    assert peak == pytest.approx({"kn32-gradual-linear-zerogamma": 0.1, "kn128-none-linear-zerogamma": 0.4,
                                  "kn128-constant-linear-zerogamma": 0.4, "kn128-gradual-linear-zerogamma": 0.4,
                                  "kn512-gradual-linear-zerogamma": 1.6, "kn128-gradual-none-zerogamma": 0.1,
                                  "kn128-gradual-sqrt-zerogamma": 0.2})
    # The LR through training at kn=128 (31 updates per epoch of 4000 images): warmup over half an epoch.
    lr = {w: cfgs[f"kn128-{w}-linear-zerogamma-seed0"].schedule().lr for w in ("none", "constant", "gradual")}
    assert [lr["none"](e) for e in (0, 0.25, 3)] == pytest.approx([0.4, 0.4, 0.04])
    assert [lr["constant"](e) for e in (0, 0.25, 0.5)] == pytest.approx([0.1, 0.1, 0.4])
    assert [lr["gradual"](e) for e in (0, 0.25, 0.5, 8.5)] == pytest.approx([0.1, 0.25, 0.4, 0.0004])
    # kn beyond the micro-batch by accumulation, same BN groups.
    plan = plan_batches(cfgs["kn512-gradual-linear-zerogamma-seed0"], world_size=1)
    assert (plan.per_device_batch_size, plan.accumulation_steps, plan.bn_groups_per_update) == (128, 4, 16)


def test_full_mode_covers_the_sweep_and_every_ablation(tmp_path):
    cfgs = configs("full", tmp_path)
    by_setting = {name.rsplit("-seed", 1)[0]: cfg for name, cfg in cfgs.items()}
    assert len(cfgs) == 3 * len(by_setting) == 42
    assert sorted(c.batch.global_batch_size for n, c in by_setting.items() if "gradual-linear-zerogamma" in n) == [
        32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert by_setting["kn1024-gradual-linear-gamma1"].model.zero_init_last is False
    assert by_setting["kn1024-gradual-sqrt-zerogamma"].schedule().peak_lr == pytest.approx(0.1 * math.sqrt(32))
    kn1024 = by_setting["kn1024-gradual-linear-zerogamma"].schedule()
    assert [kn1024.lr(e) for e in (0, 0.5, 1, 6, 17)] == pytest.approx([0.1, 1.65, 3.2, 0.32, 0.0032])
    assert by_setting["kn8192-gradual-linear-zerogamma"].batch.per_device_batch_size == 256


def test_cpu_mode_puts_table1_in_the_papers_8k_regime(tmp_path):
    cfgs = configs("cpu", tmp_path)
    assert sorted({name.rsplit("-seed", 1)[0] for name in cfgs}) == [
        "kn128-constant-linear-zerogamma", "kn128-gradual-linear-zerogamma", "kn128-none-linear-zerogamma",
        "kn32-gradual-linear-zerogamma"]
    assert len(cfgs) == 12
    train_images = 100 * 160
    kn = cfgs["kn128-constant-linear-zerogamma-seed1"].batch.global_batch_size
    assert cfgs["kn128-constant-linear-zerogamma-seed1"].data.generate.train_per_class == 160
    assert paper_kn_at(train_images // kn) == 8192  # 125 updates per epoch, the paper's 156 at 8k
    assert cfgs["kn128-none-linear-zerogamma-seed2"].schedule().peak_lr == pytest.approx(0.4)


def test_the_paper_kn_with_as_many_updates_per_epoch():
    assert paper_kn_at(156) == 8192 and paper_kn_at(5005) == 256 and paper_kn_at(19) == 65536
    assert paper_kn_at(4) is None and paper_kn_at(40_000) is None and paper_kn_at(None) is None


def record_run(run, val_errors, updates_per_epoch):
    """A run's metrics.jsonl as the trainer writes it."""
    writer = JsonlWriter(run.run_dir / "metrics.jsonl")
    writer.write({"kind": "run", "name": run.name, "global_batch_size": run.setting.global_batch_size,
                  "updates_per_epoch": updates_per_epoch, "time": 1000.0})
    for epoch, error in enumerate(val_errors, start=1):
        writer.write({"kind": "epoch", "epoch": epoch, "train_loss": 1.0, "train_top1_error": error + 5,
                      "val_top1_error": error, "lr": 0.1, "time": 1000.0 + 60 * epoch})
    writer.close()


def test_report_tables_and_figures_come_from_recorded_metrics(tmp_path):
    runs = build_runs("quick", tmp_path / "runs")
    finals = {"kn32-gradual-linear-zerogamma": [30.0, 32.0, 34.0], "kn128-none-linear-zerogamma": [40.0, 41.0, 45.0],
              "kn128-constant-linear-zerogamma": [50.0, 50.0, 50.0], "kn128-gradual-linear-zerogamma": [31.0, 33.0, 32.0],
              "kn512-gradual-linear-zerogamma": [60.0, 70.0, 80.0], "kn128-gradual-none-zerogamma": [90.0, 91.0, 92.0],
              "kn128-gradual-sqrt-zerogamma": [35.0, 35.0, 38.0]}
    for run in runs:
        if run.name == "kn128-constant-linear-zerogamma-seed2":
            record_run(run, [80.0] * 4, 39)  # interrupted after 4 of 9 epochs: no error yet
            continue
        final = finals[run.setting.name][run.seed]
        record_run(run, [90.0] * 8 + [final], {32: 156, 128: 39, 512: 9}[run.setting.global_batch_size])
    records = collect("quick", runs)
    provenance = {"command": "goyal-replicate --mode quick", "machine": "test", "date": "2026-01-01",
                  "duration_s": 600.0, "jobs": 2, "train_s": 1080.0, "versions": {"torch": "x"}, "scale": "tiny"}
    paths = write_report("quick", records, tmp_path / "out", provenance)
    report = (tmp_path / "out" / "results.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("|")}
    assert rows["baseline kn=32"] == "| baseline kn=32 | 1 | 32 | 32 | 0.1 | 156 | 32.00 ± 2.00 (n=3) | 23.60 ± 0.12 |"
    assert rows["no warmup"] == "| no warmup | 4 | 32 | 128 | 0.4 | 39 | 42.00 ± 2.65 (n=3) | 24.84 ± 0.37 |"
    assert rows["constant warmup"].endswith("| 50.00 ± 0.00 (n=2) | 25.88 ± 0.56 |")
    assert rows["128"] == "| 128 | 4 | 0.4 | 39 | 32.00 ± 1.00 (n=3) | 32k: 27.55 |"
    assert rows["512"] == "| 512 | 16 | 1.6 | 9 | 70.00 ± 10.00 (n=3) | outside the paper's range |"
    assert rows["no LR scaling"] == "| no LR scaling | 0.1 | 91.00 ± 1.00 (n=3) | 41.67 |"
    assert rows["square-root scaling"] == "| square-root scaling | 0.2 | 36.00 ± 1.73 (n=3) | 26.22 |"
    assert "wall time 10.0 min with 2 runs at once, training time of all runs together 18.0 min" in report
    assert ("### Table 1 analog: warmup at kn = 128, 39 updates per epoch (the paper's: kn = 8k, 156 updates "
            "per epoch)") in report
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["runs"]) == 21 and sum(r["error"] is None for r in saved["runs"]) == 1
    for name in ("error_vs_kn.png", "curves_warmup.png", "curves_kn.png"):
        png = tmp_path / "out" / name
        assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_only_rebuilds_from_the_runs_without_training(tmp_path, capsys):
    runs = build_runs("quick", tmp_path / "runs", seeds=[0])
    for run in runs:
        record_run(run, [50.0] * 9, 39)
    code = main(["--mode", "quick", "--seeds", "0", "--runs-dir", str(tmp_path / "runs"), "--out",
                 str(tmp_path / "out"), "--report-only"])
    assert code == 0
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| gradual warmup | 4 | 32 | 128 | 0.4 | 39 | 50.00 (n=1) | 23.74 ± 0.09 |" in report
    assert "training time of all runs together 63.0 min" in report and "wall time" not in report
    # Redrawn again, the report keeps the provenance of the sweep that trained the runs.
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    saved["provenance"].update(duration_s=1234.0, command="goyal-replicate --mode quick", jobs=2)
    (tmp_path / "out" / "results.json").write_text(json.dumps(saved))
    assert main(["--mode", "quick", "--seeds", "0", "--runs-dir", str(tmp_path / "runs"), "--out",
                 str(tmp_path / "out"), "--report-only"]) == 0
    assert "Command: `goyal-replicate --mode quick`" in (tmp_path / "out" / "results.md").read_text()
    assert "wall time 20.6 min with 2 runs at once" in (tmp_path / "out" / "results.md").read_text()
    assert Setting(256).name == "kn256-gradual-linear-zerogamma"


def test_each_run_is_one_validated_recipe_written_whole_for_training(tmp_path):
    runs = build_runs("cpu", tmp_path / "runs", seeds=[3])
    run = next(r for r in runs if r.name == "kn128-none-linear-zerogamma-seed3")
    command = train_command(run)
    recipe = tmp_path / "runs" / "cpu" / "recipes" / "kn128-none-linear-zerogamma-seed3.yaml"
    assert command[-3:] == ["goyal_recipe.cli", "train", str(recipe)]
    # The file the run trains from is the design's config, key for key, with no override left to parse.
    assert load_config(recipe) == run.config == load_config(BASE_RECIPE, list(run.overrides))
    assert run.run_dir == tmp_path / "runs" / "cpu" / "kn128-none-linear-zerogamma-seed3" == run.config.run_dir
    assert (run.config.optim.warmup, run.config.batch.global_batch_size, run.config.run.seed) == ("none", 128, 3)


def test_scaling_mode_sweeps_sgd_and_lars_and_runs_table1_five_times(tmp_path):
    runs = build_runs("scaling", tmp_path)
    by_setting = {}
    for run in runs:
        by_setting.setdefault(run.setting.name, []).append(run.seed)
    sweep = {f"kn{kn}-gradual-linear-zerogamma{suffix}": [0, 1, 2] for kn in (32, 128, 256, 512, 1024, 2048)
             for suffix in ("", "-lars")}
    table1 = {"kn32-gradual-linear-zerogamma": [0, 1, 2, 3, 4], "kn128-gradual-linear-zerogamma": [0, 1, 2, 3, 4],
              "kn128-none-linear-zerogamma": [0, 1, 2, 3, 4], "kn128-constant-linear-zerogamma": [0, 1, 2, 3, 4]}
    assert by_setting == {**sweep, **table1} and len(runs) == 50
    for run in runs:
        cfg, kn = run.config, run.setting.global_batch_size
        # One base recipe: only kn, the warmup and the optimizer differ; B_simple measured in every run, which
        # needs two gradients per update: kn = 32 is two micro-batches of 16, one BN group each.
        assert (cfg.model.bn, cfg.model.bn_group_size, cfg.run.noise_scale, cfg.data.generate.train_per_class) == (
            "ghost", 16, True, 160)
        assert (cfg.optim.epochs, cfg.optim.milestones, cfg.optim.warmup_epochs, cfg.optim.decay) == (
            9, [3, 6, 8], 0.5, "step")
        assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 1e-4)
        assert cfg.optim.optimizer == ("lars" if run.setting.name.endswith("lars") else "sgd")
        if cfg.optim.optimizer == "lars":
            # One trust coefficient at every kn (apex LARC's default), nothing else changed from SGD at that kn.
            assert cfg.optim.trust_coefficient == 0.02
            sgd = next(r.config for r in runs if r.name == run.name.replace("-lars", ""))
            changed = {section: {k: v for k, v in fields.items() if sgd.model_dump()[section][k] != v}
                       for section, fields in cfg.model_dump().items() if isinstance(fields, dict)}
            assert {s: c for s, c in changed.items() if c} == {
                "run": {"name": run.name}, "optim": {"optimizer": "lars", "trust_coefficient": 0.02}}
        assert cfg.schedule().peak_lr == pytest.approx(0.1 * kn / 32)
        plan = plan_batches(cfg, world_size=1)
        assert (plan.per_device_batch_size, plan.accumulation_steps) == {
            32: (16, 2), 128: (64, 2), 256: (128, 2), 512: (128, 4), 1024: (128, 8), 2048: (128, 16)}[kn]
        assert 100 * 160 // kn == {32: 500, 128: 125, 256: 62, 512: 31, 1024: 15, 2048: 7}[kn]
        # About 10 step records per epoch at every kn, each update's gradients measured for the noise scale.
        assert (cfg.run.log_every_updates, cfg.run.noise_scale_every_updates) == (
            {32: 50, 128: 12, 256: 6, 512: 3, 1024: 1, 2048: 1}[kn], 1)
    # Every setting's first seed trains before any second seed: a stopped sweep has every point.
    order = [run.name for run in training_order(runs)]
    assert len(by_setting) == 14 and order[:14] == [f"{s}-seed0" for s in by_setting] and order[-2:] == [
        "kn128-constant-linear-zerogamma-seed4", "kn128-gradual-linear-zerogamma-seed4"]


def test_reading_rules_standard_errors_and_where_the_error_rises():
    from goyal_recipe.replicate.scaling import Estimate, compare, rise_kn

    a, b = Estimate(11.0, 1.0, 5), Estimate(12.0, 1.0, 5)
    c = compare(a, b)
    assert (c.gap, c.se, c.z) == pytest.approx((1.0, math.sqrt(0.4), 1.0 / math.sqrt(0.4)))
    assert c.verdict == "not decisive"
    assert compare(a, Estimate(13.0, 1.0, 5)).verdict == "decisive"  # 2 / 0.632 = 3.2 SE
    assert compare(Estimate(13.0, 1.0, 5), a).verdict == "reversed, decisively"
    assert compare(a, Estimate(20.0, None, 1)).verdict == "not decided (fewer than 2 seeds)"
    # The paper's own baseline < gradual warmup gap (0.14 over 5 runs each) is 2.09 SE.
    assert compare(Estimate(23.60, 0.12, 5), Estimate(23.74, 0.09, 5)).z == pytest.approx(0.14 / math.sqrt(0.0225 / 5), abs=1e-12)
    flat, up, upper = Estimate(11.5, 1.0, 3), Estimate(16.0, 1.0, 3), Estimate(30.0, 2.0, 3)
    assert rise_kn([(32, a), (128, flat), (512, up), (2048, upper)]) == 512
    # A decisive point followed by one that is not is no rise yet; the rise must hold to the largest kn.
    assert rise_kn([(32, a), (128, up), (512, flat), (2048, upper)]) == 2048
    assert rise_kn([(32, a), (128, flat), (512, flat)]) is None


def record_scaling_run(run, final, noise_end, updates_per_epoch):
    writer = JsonlWriter(run.run_dir / "metrics.jsonl")
    writer.write({"kind": "run", "name": run.name, "updates_per_epoch": updates_per_epoch, "time": 0.0})
    # B_simple early and late: the medians over the first and the last epoch (100 and noise_end), which a
    # tenfold jump of one logged value does not move; a resumed run's repeated update 2 counts once.
    steps = ((1, 0.5, 90.0), (2, 1.0, 110.0), (2, 1.0, 110.0), (3, 1.5, 5000.0), (4, 8.4, noise_end),
             (5, 8.7, 10 * noise_end), (6, 9.0, noise_end - 10))
    for update, epoch, b in steps:
        writer.write({"kind": "step", "update": update, "epoch": epoch, "loss": 1.0, "noise_scale": b, "time": 1.0})
    for epoch in range(1, 10):
        writer.write({"kind": "epoch", "epoch": epoch, "train_top1_error": 50.0,
                      "val_top1_error": final if epoch == 9 else 50.0, "time": 60.0 * epoch})
    writer.close()


def test_scaling_report_reads_the_sweep_by_its_rules(tmp_path):
    finals = {"kn32-gradual-linear-zerogamma": [10, 11, 12, 10, 12], "kn128-gradual-linear-zerogamma": [11, 12, 13, 11, 13],
              "kn256-gradual-linear-zerogamma": [13, 14, 15], "kn512-gradual-linear-zerogamma": [20, 21, 22],
              "kn1024-gradual-linear-zerogamma": [30, 31, 32], "kn2048-gradual-linear-zerogamma": [40, 42, 44],
              "kn128-none-linear-zerogamma": [14, 15, 16, 14, 16], "kn128-constant-linear-zerogamma": [20] * 5,
              "kn32-gradual-linear-zerogamma-lars": [12, 13, 14], "kn128-gradual-linear-zerogamma-lars": [12, 13, 14],
              "kn256-gradual-linear-zerogamma-lars": [13, 14, 15], "kn512-gradual-linear-zerogamma-lars": [13, 14, 15],
              "kn1024-gradual-linear-zerogamma-lars": [13, 14, 15], "kn2048-gradual-linear-zerogamma-lars": [14, 15, 16]}
    runs = build_runs("scaling", tmp_path / "runs")
    for run in runs:
        kn = run.setting.global_batch_size
        record_scaling_run(run, float(finals[run.setting.name][run.seed]), 400.0 if kn == 32 else 4.0 * kn,
                           16000 // kn)
    provenance = {"command": "goyal-replicate --mode scaling", "machine": "test", "date": "2026-01-01",
                  "duration_s": None, "jobs": 2, "train_s": 60.0, "versions": {}, "scale": "tiny"}
    paths = write_report("scaling", collect("scaling", runs), tmp_path / "out", provenance)
    report = (tmp_path / "out" / "results.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("|")}
    assert rows["32"] == "| 32 | 2 | 0.1 | 500 | 11.00 ± 1.00 (n=5) | 13.00 ± 1.00 (n=3) | 100 / 400 | 100 / 400 |"
    assert rows["2048"] == ("| 2048 | 128 | 6.4 | 7 | 42.00 ± 2.00 (n=3) | 15.00 ± 1.00 (n=3) | 100 / 8192 | "
                            "100 / 8192 |")
    assert rows["baseline kn=32"] == "| baseline kn=32 | 2 | 16 | 32 | 0.1 | 500 | 11.00 ± 1.00 (n=5) | 23.60 ± 0.12 |"
    # Table 1's orderings: the paper's gap and ours in standard errors of the difference.
    assert rows["baseline kn=32 < gradual warmup"] == (
        "| baseline kn=32 < gradual warmup | +0.14 (+2.1 SE) | decisive | +1.00 (+1.6 SE) | not decisive |")
    assert rows["no warmup < constant warmup"] == (
        "| no warmup < constant warmup | +1.04 (+3.5 SE) | decisive | +5.00 (+11.2 SE) | decisive |")
    # kn = 256 is 3 / sqrt(1/5 + 1/3) = 4.1 SE above kn = 32, and every larger kn is too.
    assert ("- **SGD** error rises from kn = 256 (last kn not decisively above kn = 32: 128); B_simple of the "
            "kn = 32 SGD runs: 100 over the first epoch, 400 over the last. The rise starts at 0.64x the late B_simple and "
            "2.6x the early one; the late B_simple lies outside [128, 256].") in report
    # LARS past each B_simple against SGD at kn = 32: +2 / sqrt(1/5 + 1/3) = 2.7 SE at kn = 128.
    assert ("- **LARS** past the early B_simple (100), against SGD at kn = 32 (the accuracy to keep): kn = 128: +2.00 "
            "(+2.7 SE); kn = 256: +3.00 (+4.1 SE); kn = 512: +3.00 (+4.1 SE); kn = 1024: +3.00 (+4.1 SE); kn = 2048: "
            "+4.00 (+5.5 SE): not flat (flat: no point decisively above).") in report
    assert ("- **LARS** past the late B_simple (400), against SGD at kn = 32 (the accuracy to keep): kn = 512: +3.00 "
            "(+4.1 SE); kn = 1024: +3.00 (+4.1 SE); kn = 2048: +4.00 (+5.5 SE): not flat (flat: no point "
            "decisively above).") in report
    # LARS minus SGD at the same kn: -7 / sqrt(1/3 + 1/3) = -8.6 SE, -27 / sqrt(1/3 + 4/3) = -20.9 SE.
    assert "kn = 512: -7.00 (-8.6 SE); kn = 1024: -17.00 (-20.8 SE); kn = 2048: -27.00 (-20.9 SE)." in report
    png = tmp_path / "out" / "error_vs_kn.png"
    assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_jobs_below_one_is_refused_before_anything_is_written(tmp_path):
    from goyal_recipe.cli import replicate_main

    assert replicate_main(["--mode", "quick", "--jobs", "0", "--runs-dir", str(tmp_path / "runs"),
                           "--out", str(tmp_path / "out"), "--report-only"]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
