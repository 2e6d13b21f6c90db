"""`goyal-replicate`: the paper's experiments at a scale one machine affords, with the evidence written out.

Every run is `recipes/replication/base.yaml` plus only what the paper changes between its runs:
kn, the warmup, the LR scaling rule and the zero-gamma init. A mode fixes the scale (data set size,
epochs and milestones in the paper's 90 / 30, 60, 80 proportions, warmup, the kn range, seeds); the
BN group stays n = 32 at every kn (ghost BN), and kn beyond the per-device micro-batch is reached by
gradient accumulation, exactly as the paper simulated its largest minibatches.

    goyal-replicate --mode quick          # < 15 min on 2 CPU cores: docs/replication/quick/
    goyal-replicate --mode cpu            # Table 1 at 125 updates per epoch: about an hour on 2 CPU cores
    goyal-replicate --mode full --jobs 2  # the whole design, for a GPU
    goyal-replicate --mode quick --dry-run

Finished runs are not repeated and unfinished ones resume, so the command can be rerun after an
interruption. The report (markdown tables beside the paper's numbers, figures, a JSON of every run's
per-epoch errors) is rebuilt from the runs' `metrics.jsonl` files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, load_config
from .metrics import read_jsonl
from .report import figure_axes, save_figure

BASE_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "replication" / "base.yaml"
IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_EPOCHS = 90
PAPER_ERROR_EPOCHS = 5
"""A run's error in the paper is the median of its last 5 of 90 epochs; modes keep that share."""

# Top-1 validation error (%) of ResNet-50 on ImageNet in the paper (Table 1, Fig. 1/5, Sec. 5).
PAPER_TABLE1 = {"baseline": (23.60, 0.12), "none": (24.84, 0.37), "constant": (25.88, 0.56),
                "gradual": (23.74, 0.09)}
PAPER_TABLE1_KN = 8192
PAPER_ERROR_BY_KN = {128: 23.49, 256: 23.60, 512: 23.48, 1024: 23.53, 2048: 23.49, 4096: 23.56, 8192: 23.74,
                     16384: 24.79, 32768: 27.55, 65536: 33.96}
PAPER_ABLATIONS = {"no_scaling": 41.67, "sqrt_scaling": 26.22, "gamma_one": 24.11}


@dataclass(frozen=True)
class Setting:
    """One point of the paper's design: kn and the three things its experiments vary."""

    global_batch_size: int
    warmup: str = "gradual"
    scaling: str = "linear"
    zero_gamma: bool = True

    @property
    def name(self) -> str:
        return f"kn{self.global_batch_size}-{self.warmup}-{self.scaling}-{'zerogamma' if self.zero_gamma else 'gamma1'}"


@dataclass(frozen=True)
class Mode:
    """The scale of a sweep. Epoch counts follow the paper's proportions (90 / 30, 60, 80 / 5 warmup)."""

    description: str
    train_per_class: int
    val_per_class: int
    epochs: int
    milestones: tuple[float, ...]
    warmup_epochs: float
    baseline_kn: int
    large_kn: int
    """The Table 1 and ablation kn: the largest kn whose updates per epoch are near the paper's limit (8k: 156)."""
    sweep_kn: tuple[int, ...]
    ablations: tuple[str, ...]
    seeds: tuple[int, ...]
    max_micro_batch: int
    """Per-device micro-batch cap: kn above it is reached by gradient accumulation."""
    workers: int
    """Loader workers per run."""
    eval_every_epochs: int = 1
    """The last epoch is always evaluated, and a run's error needs only the last ones."""

    def settings(self) -> list[Setting]:
        """Every distinct run setting of the mode, in report order; a setting shared by two tables runs once."""
        table1 = [Setting(self.baseline_kn)] + [Setting(self.large_kn, warmup=w) for w in ("none", "constant", "gradual")]
        sweep = [Setting(kn) for kn in self.sweep_kn]
        ablation = {"no_scaling": Setting(self.large_kn, scaling="none"),
                    "sqrt_scaling": Setting(self.large_kn, scaling="sqrt"),
                    "gamma_one": Setting(self.large_kn, zero_gamma=False)}
        return list(dict.fromkeys(table1 + sweep + [ablation[a] for a in self.ablations]))

    @property
    def error_epochs(self) -> int:
        return max(1, round(self.epochs * PAPER_ERROR_EPOCHS / PAPER_EPOCHS))


MODES = {
    "quick": Mode(
        description="a reduced design that runs in under 15 minutes on 2 CPU cores",
        train_per_class=40, val_per_class=20, epochs=9, milestones=(3, 6, 8), warmup_epochs=0.5,
        baseline_kn=32, large_kn=128, sweep_kn=(32, 128, 512), ablations=("no_scaling", "sqrt_scaling"),
        seeds=(0, 1, 2), max_micro_batch=128, workers=0, eval_every_epochs=3),
    "cpu": Mode(
        description="Table 1 in the paper's 8k regime (125 updates per epoch), about an hour on 2 CPU cores",
        train_per_class=160, val_per_class=20, epochs=9, milestones=(3, 6, 8), warmup_epochs=0.5,
        baseline_kn=32, large_kn=128, sweep_kn=(32, 128), ablations=(),
        seeds=(0, 1, 2), max_micro_batch=128, workers=0),
    "full": Mode(
        description="the whole design, for a GPU (about a day on 2 CPU cores)",
        train_per_class=1280, val_per_class=50, epochs=18, milestones=(6, 12, 16), warmup_epochs=1,
        baseline_kn=32, large_kn=1024, sweep_kn=(32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
        ablations=("no_scaling", "sqrt_scaling", "gamma_one"), seeds=(0, 1, 2), max_micro_batch=256, workers=6),
}


@dataclass(frozen=True)
class Run:
    setting: Setting
    seed: int
    name: str
    run_dir: Path
    overrides: tuple[str, ...]


def _listing(values: Sequence[Any]) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "]"


def build_runs(mode_name: str, runs_dir: Path, seeds: Sequence[int] | None = None) -> list[Run]:
    """The runs of a mode: each setting once per seed, as overrides of the base recipe."""
    mode = MODES[mode_name]
    data_root = Path("data") / "generated" / f"replication-{mode_name}"
    common = [f"data.root={data_root}", f"data.generate.train_per_class={mode.train_per_class}",
              f"data.generate.val_per_class={mode.val_per_class}", f"data.workers={mode.workers}",
              f"run.eval_every_epochs={mode.eval_every_epochs}",
              f"optim.epochs={mode.epochs}", f"optim.milestones={_listing(mode.milestones)}",
              f"optim.warmup_epochs={mode.warmup_epochs:g}", f"run.output_dir={runs_dir / mode_name}"]
    runs = []
    for setting in mode.settings():
        micro = min(setting.global_batch_size, mode.max_micro_batch)
        for seed in mode.seeds if seeds is None else seeds:
            name = f"{setting.name}-seed{seed}"
            overrides = common + [
                f"batch.global_batch_size={setting.global_batch_size}", f"batch.per_device_batch_size={micro}",
                f"optim.warmup={setting.warmup}", f"optim.scaling={setting.scaling}",
                f"model.zero_init_last={str(setting.zero_gamma).lower()}", f"run.seed={seed}", f"run.name={name}"]
            runs.append(Run(setting, seed, name, runs_dir / mode_name / name, tuple(overrides)))
    return runs


def train_command(run: Run, recipe: Path = BASE_RECIPE) -> list[str]:
    return [sys.executable, "-m", "goyal_recipe.cli", "train", str(recipe), *run.overrides]


def read_records(metrics_path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (empty if absent)."""
    return list(read_jsonl(metrics_path)) if metrics_path.is_file() else []


def epoch_curve(records: Sequence[dict]) -> list[dict]:
    """The per-epoch errors of a run's records; a resumed run's last record of an epoch wins."""
    keys = ("epoch", "train_loss", "train_top1_error", "val_top1_error", "lr")
    epochs = {int(r["epoch"]): {k: r.get(k) for k in keys} for r in records if r.get("kind") == "epoch"}
    return [epochs[e] for e in sorted(epochs)]


def final_error(curve: list[dict], mode: Mode) -> float | None:
    """The paper's error of a run: the median validation top-1 error of its last epochs (5 of 90 in
    the paper, the same share here); None until the run has finished them."""
    last = [e["val_top1_error"] for e in curve if e["epoch"] > mode.epochs - mode.error_epochs]
    if not curve or curve[-1]["epoch"] != mode.epochs or len(last) < mode.error_epochs or None in last:
        return None
    return statistics.median(last)


def is_finished(run: Run, mode: Mode) -> bool:
    return final_error(epoch_curve(read_records(run.run_dir / "metrics.jsonl")), mode) is not None


def collect(mode_name: str, runs: Sequence[Run]) -> list[dict]:
    """One record per run from its metrics.jsonl: setting, seed, kn, k, n, eta, updates per epoch, error, curve."""
    mode = MODES[mode_name]
    records = []
    for run in runs:
        logged = read_records(run.run_dir / "metrics.jsonl")
        curve = epoch_curve(logged)
        header = next((r for r in logged if r.get("kind") == "run"), {})
        times = [r["time"] for r in logged if r.get("time") is not None]
        cfg = load_config(BASE_RECIPE, list(run.overrides))
        records.append({
            "name": run.name, "setting": asdict(run.setting), "seed": run.seed,
            "global_batch_size": run.setting.global_batch_size, "bn_group_size": cfg.model.bn_group_size,
            "bn_groups": run.setting.global_batch_size // cfg.model.bn_group_size,
            "peak_lr": cfg.schedule().peak_lr,
            "updates_per_epoch": header.get("updates_per_epoch"),
            "error": final_error(curve, mode), "train_s": max(times) - min(times) if times else None,
            "epochs": curve})
    return records


# ------------------------------------------------------------------------------------------------
# running


@dataclass
class _Active:
    run: Run
    process: subprocess.Popen
    log: Any
    started: float = field(default_factory=time.monotonic)


def run_all(runs: Sequence[Run], mode: Mode, jobs: int, threads_per_job: int, log_dir: Path) -> list[str]:
    """Train every unfinished run, `jobs` at a time; returns the names of runs that failed."""
    todo = [r for r in runs if not is_finished(r, mode)]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to train, {jobs} at a time",
          flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_job), MKL_NUM_THREADS=str(threads_per_job))
    log_dir.mkdir(parents=True, exist_ok=True)
    active: list[_Active] = []
    failed: list[str] = []
    done = 0
    while todo or active:
        while todo and len(active) < jobs:
            run = todo.pop(0)
            log = open(log_dir / f"{run.name}.log", "a")
            process = subprocess.Popen(train_command(run), stdout=log, stderr=subprocess.STDOUT, env=env)
            active.append(_Active(run, process, log))
        time.sleep(0.5)
        for job in [a for a in active if a.process.poll() is not None]:
            active.remove(job)
            job.log.close()
            done += 1
            took = time.monotonic() - job.started
            if job.process.returncode:
                failed.append(job.run.name)
                print(f"[{done}] {job.run.name}: FAILED (exit {job.process.returncode}); see {log_dir / job.run.name}.log",
                      flush=True)
                continue
            error = final_error(epoch_curve(read_records(job.run.run_dir / "metrics.jsonl")), mode)
            print(f"[{done}] {job.run.name}: top-1 error {error if error is None else f'{error:.2f}%'} "
                  f"({took:.0f} s)", flush=True)
    return failed


# ------------------------------------------------------------------------------------------------
# report


def summarise(records: Sequence[dict]) -> dict[str, dict]:
    """Per setting: mean and sample std of the run errors over seeds (the paper's mean +- std), with the
    mean per-epoch training and validation error curves."""
    by_setting: dict[str, list[dict]] = {}
    for r in records:
        by_setting.setdefault(Setting(**r["setting"]).name, []).append(r)
    out = {}
    for name, runs in by_setting.items():
        errors = [r["error"] for r in runs if r["error"] is not None]
        finished = [r for r in runs if r["error"] is not None]
        curves = {}
        for key in ("train_top1_error", "val_top1_error"):
            per_epoch: dict[int, list[float]] = {}
            for r in finished:
                for e in r["epochs"]:
                    if e[key] is not None:
                        per_epoch.setdefault(e["epoch"], []).append(e[key])
            curves[key] = [(epoch, statistics.fmean(v)) for epoch, v in sorted(per_epoch.items())]
        first = runs[0]
        out[name] = {"setting": first["setting"], "global_batch_size": first["global_batch_size"],
                     "bn_group_size": first["bn_group_size"], "bn_groups": first["bn_groups"],
                     "peak_lr": first["peak_lr"], "updates_per_epoch": first["updates_per_epoch"],
                     "seeds": len(errors), "mean": statistics.fmean(errors) if errors else None,
                     "std": statistics.stdev(errors) if len(errors) > 1 else None, "curves": curves}
    return out


def _error_cell(s: dict) -> str:
    if s["mean"] is None:
        return "not finished"
    std = f" ± {s['std']:.2f}" if s["std"] is not None else ""
    return f"{s['mean']:.2f}{std} (n={s['seeds']})"


def paper_kn_at(updates_per_epoch: float | None) -> int | None:
    """The paper's kn whose ImageNet epoch holds about as many updates (nearest on a log scale, within a
    factor of 2); None outside the paper's range."""
    if not updates_per_epoch:
        return None
    target = IMAGENET_TRAIN_IMAGES / updates_per_epoch
    nearest = min(PAPER_ERROR_BY_KN, key=lambda kn: abs(math.log(kn / target)))
    return nearest if abs(math.log2(nearest / target)) <= 1 else None


def _kn(kn: int) -> str:
    return f"{kn // 1024}k" if kn >= 1024 and kn % 1024 == 0 else str(kn)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def markdown_tables(mode: Mode, summary: dict[str, dict]) -> list[str]:
    """The paper's three tables (Table 1, error against kn, ablations), ours beside its numbers."""
    def get(setting: Setting) -> dict:
        return summary[setting.name]

    def u(s: dict) -> str:
        return "?" if s["updates_per_epoch"] is None else str(s["updates_per_epoch"])

    large = get(Setting(mode.large_kn))
    at_large = (f"kn = {mode.large_kn}, {u(large)} updates per epoch (the paper's: kn = 8k, "
                f"{IMAGENET_TRAIN_IMAGES // PAPER_TABLE1_KN} updates per epoch)")
    lines = [f"### Table 1 analog: warmup at {at_large}", ""]
    rows = []
    for label, setting, paper in (
        (f"baseline kn={mode.baseline_kn}", Setting(mode.baseline_kn), "baseline"),
        ("no warmup", Setting(mode.large_kn, warmup="none"), "none"),
        ("constant warmup", Setting(mode.large_kn, warmup="constant"), "constant"),
        ("gradual warmup", Setting(mode.large_kn, warmup="gradual"), "gradual"),
    ):
        s = get(setting)
        mean, std = PAPER_TABLE1[paper]
        rows.append([label, s["bn_groups"], s["bn_group_size"], s["global_batch_size"], f"{s['peak_lr']:g}", u(s),
                     _error_cell(s), f"{mean:.2f} ± {std:.2f}"])
    lines += _table(["setting", "k", "n", "kn", "η", "updates/epoch", "top-1 error (%)", "paper (%)"], rows)
    lines += ["", "### Error against kn (gradual warmup, linear scaling)", ""]
    rows = []
    for kn in mode.sweep_kn:
        s = get(Setting(kn))
        equivalent = paper_kn_at(s["updates_per_epoch"])
        rows.append([kn, s["bn_groups"], f"{s['peak_lr']:g}", u(s), _error_cell(s),
                     f"{_kn(equivalent)}: {PAPER_ERROR_BY_KN[equivalent]:.2f}" if equivalent
                     else "outside the paper's range"])
    lines += _table(["kn", "k", "η", "updates/epoch", "top-1 error (%)",
                     "paper at the kn with as many updates/epoch (%)"], rows)
    if not mode.ablations:
        return lines
    lines += ["", f"### Ablations at {at_large}", ""]
    rows = []
    labels = {"no_scaling": ("no LR scaling", Setting(mode.large_kn, scaling="none")),
              "sqrt_scaling": ("square-root scaling", Setting(mode.large_kn, scaling="sqrt")),
              "gamma_one": ("gamma = 1 init", Setting(mode.large_kn, zero_gamma=False))}
    rows.append(["linear scaling, zero-gamma (reference)", f"{large['peak_lr']:g}", _error_cell(large),
                 f"{PAPER_ERROR_BY_KN[PAPER_TABLE1_KN]:.2f}"])
    for ablation in mode.ablations:
        label, setting = labels[ablation]
        s = get(setting)
        rows.append([label, f"{s['peak_lr']:g}", _error_cell(s), f"{PAPER_ABLATIONS[ablation]:.2f}"])
    lines += _table(["setting", "η", "top-1 error (%)", "paper (%)"], rows)
    return lines


def plot_error_vs_kn(mode: Mode, summary: dict[str, dict], path: Path) -> Path:
    """Left: our error against kn (mean +- std over seeds). Right: error above each study's baseline against
    updates per epoch, ours and the paper's, so the two scales meet on the quantity that sets the regime."""
    fig, (left, right) = figure_axes(ncols=2, figsize=(11, 4.2))
    points = [summary[Setting(kn).name] for kn in mode.sweep_kn]
    points = [p for p in points if p["mean"] is not None]
    if points:
        left.errorbar([p["global_batch_size"] for p in points], [p["mean"] for p in points],
                      yerr=[p["std"] or 0.0 for p in points], marker="o", capsize=3, label="this replication")
    left.set(xscale="log", xlabel="kn (images per update)", ylabel="top-1 validation error (%)",
             title="error against kn (gradual warmup, linear rule)")
    left.set_xticks(list(mode.sweep_kn), [_kn(kn) for kn in mode.sweep_kn])
    left.minorticks_off()  # a log axis otherwise labels its minor ticks too, over the kn labels
    baseline = summary[Setting(mode.baseline_kn).name]["mean"]
    if points and baseline is not None:
        right.plot([p["updates_per_epoch"] for p in points], [p["mean"] - baseline for p in points], "o-",
                   label=f"this replication (baseline kn={mode.baseline_kn}: {baseline:.2f}%)")
    paper_base = PAPER_ERROR_BY_KN[256]
    right.plot([IMAGENET_TRAIN_IMAGES / kn for kn in PAPER_ERROR_BY_KN],
               [e - paper_base for e in PAPER_ERROR_BY_KN.values()], "s--",
               label=f"paper, ResNet-50 ImageNet (baseline kn=256: {paper_base:.2f}%)")
    right.set(xscale="log", xlabel="updates per epoch (log; larger kn to the right)",
              ylabel="error above the study's baseline (points)", title="the regime: updates per epoch")
    right.invert_xaxis()
    return save_figure(fig, [left, right], path, legend_fontsize=8)


def plot_curves(summary: dict[str, dict], settings: Sequence[tuple[str, Setting]], title: str, path: Path) -> Path:
    """Mean training error per epoch of several settings (the paper's Fig. 2 and 4), validation dotted."""
    fig, (ax,) = figure_axes()
    for i, (label, setting) in enumerate(settings):
        curves = summary[setting.name]["curves"]
        for key, style, suffix in (("train_top1_error", "-", "train"), ("val_top1_error", ":", "val")):
            if curves[key]:
                xs, ys = zip(*curves[key])
                ax.plot(xs, ys, style, color=f"C{i}", label=f"{label} {suffix}")
    ax.set(xlabel="epochs", ylabel="top-1 error (%)", title=title)
    return save_figure(fig, [ax], path, legend_fontsize=8)


def write_report(mode_name: str, records: Sequence[dict], out_dir: Path, provenance: dict) -> list[Path]:
    """results.json (every run's recorded errors), results.md (the tables) and the figures, from `records`."""
    mode = MODES[mode_name]
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(records)
    results = out_dir / "results.json"
    results.write_text(json.dumps({"mode": mode_name, "scale": asdict(mode), "provenance": provenance,
                                   "runs": list(records)}, indent=1) + "\n")
    figures = [
        plot_error_vs_kn(mode, summary, out_dir / "error_vs_kn.png"),
        plot_curves(summary, [(f"kn={mode.baseline_kn}", Setting(mode.baseline_kn))]
                    + [(f"kn={mode.large_kn} {w} warmup", Setting(mode.large_kn, warmup=w))
                       for w in ("none", "constant", "gradual")],
                    f"warmup at kn={mode.large_kn} against kn={mode.baseline_kn} (paper: Fig. 2)",
                    out_dir / "curves_warmup.png"),
        plot_curves(summary, [(f"kn={kn}", Setting(kn)) for kn in mode.sweep_kn],
                    "training curves against kn (paper: Fig. 4)", out_dir / "curves_kn.png"),
    ]
    p = provenance
    lines = [f"# Replication, {mode_name} mode", "",
             f"Command: `{p['command']}`  ", f"Machine: {p['machine']}  ",
             f"Date: {p['date']}; " + (f"wall time {p['duration_s'] / 60:.1f} min with {p['jobs']} runs at once, "
                                      if p["duration_s"] is not None else "")
             + f"training time of all runs together {p['train_s'] / 60:.1f} min  ",
             f"Versions: {', '.join(f'{k} {v}' for k, v in p['versions'].items() if v)}", "",
             f"Scale ({mode.description}): {p['scale']}", "",
             f"Each cell is the mean ± sample std over seeds of a run's error, the median top-1 validation error "
             f"of its last {mode.error_epochs} epoch(s) (the paper: last 5 of 90).", "",
             *markdown_tables(mode, summary), "",
             "![error against kn](error_vs_kn.png)", "", "![warmup curves](curves_warmup.png)", "",
             "![curves against kn](curves_kn.png)", ""]
    report = out_dir / "results.md"
    report.write_text("\n".join(lines))
    return [results, report, *figures]


def describe_scale(mode_name: str, runs: Sequence[Run]) -> str:
    mode = MODES[mode_name]
    cfg = load_config(BASE_RECIPE, list(runs[0].overrides))
    g, m = cfg.data.generate, cfg.model
    widths = "x".join(str(c) for c in m.kwargs.get("channels", ())) or "default"
    return (f"{g.num_classes} generated classes (difficulty {g.difficulty:g}), {g.num_classes * g.train_per_class} "
            f"training and {g.num_classes * g.val_per_class} validation {g.image_width}x{g.image_height} JPEGs, "
            f"{cfg.data.image_size} px crops; timm {m.name} (channels {widths}); BN over n = {m.bn_group_size} at "
            f"every kn; eta = {cfg.optim.base_lr:g} x kn / {cfg.optim.base_batch_size}; {mode.epochs} epochs, x0.1 at "
            f"{_listing(mode.milestones)}, warmup {mode.warmup_epochs:g} epoch(s) from eta = {cfg.optim.base_lr:g}; "
            f"seeds {_listing(sorted({r.seed for r in runs}))}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="goyal-replicate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained at once (default: one per CPU core without a GPU, else 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the mode's (0 1 2)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "replication")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default docs/replication/MODE)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their overrides, train nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the runs' metrics")
    args = parser.parse_args(argv)
    import torch

    mode = MODES[args.mode]
    runs = build_runs(args.mode, args.runs_dir, args.seeds)
    if args.dry_run:
        for run in runs:
            print(run.name, " ".join(run.overrides[-7:-2]))
        print(f"{len(runs)} runs; scale: {describe_scale(args.mode, runs)}")
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = args.jobs or (1 if torch.cuda.is_available() else cores)
    if jobs < 1:
        print("goyal-replicate: error: --jobs must be >= 1", file=sys.stderr)
        return 2
    start = time.time()
    failed = []
    try:
        if not args.report_only:
            from .data.pipeline import generate_configured

            generate_configured(load_config(BASE_RECIPE, list(runs[0].overrides)))  # once, before parallel runs
            failed = run_all(runs, mode, jobs, max(1, cores // jobs), args.runs_dir / args.mode / "logs")
        records = collect(args.mode, runs)
    except (ConfigError, OSError) as e:
        print(f"goyal-replicate: error: {e}", file=sys.stderr)
        return 2
    from .provenance import describe_machine, machine_info, utc_now, versions

    out_dir = args.out or Path("docs") / "replication" / args.mode
    command = "goyal-replicate " + " ".join(argv if argv is not None else sys.argv[1:])
    previous = out_dir / "results.json"
    if args.report_only and previous.is_file():  # redrawn: the provenance stays that of the training
        provenance = json.loads(previous.read_text())["provenance"]
    else:
        provenance = {"command": command.strip(), "machine": describe_machine(machine_info()), "date": utc_now(),
                      "duration_s": None if args.report_only else time.time() - start, "jobs": jobs,
                      "train_s": sum(r["train_s"] or 0.0 for r in records), "versions": versions(),
                      "scale": describe_scale(args.mode, runs)}
    for path in write_report(args.mode, records, out_dir, provenance):
        print(path)
    if failed:
        print(f"goyal-replicate: error: {len(failed)} runs failed ({', '.join(failed)}); their logs are in "
              f"{args.runs_dir / args.mode / 'logs'}; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
