"""The report of a sweep, rebuilt from its runs' `metrics.jsonl`: per-run records, per-setting summaries,
the paper's tables with its numbers beside ours, and the figures."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from ..records import RunLog, read_run
from ..report import figure_axes, save_figure
from .design import (IMAGENET_TRAIN_IMAGES, MODES, PAPER_ABLATIONS, PAPER_ERROR_BY_KN, PAPER_TABLE1, PAPER_TABLE1_KN,
                     Mode, Run, Setting, _listing)


def read_log(run: Run) -> RunLog:
    """The run's records, each update and epoch once (a resumed run's last record wins); empty if absent."""
    return read_run(run.run_dir, missing_ok=True)


def epoch_curve(log: RunLog) -> list[dict]:
    """The per-epoch errors of a run."""
    keys = ("epoch", "train_loss", "train_top1_error", "val_top1_error", "lr")
    return [{k: getattr(e, k) for k in keys} for e in log.epochs]


def noise_curve(log: RunLog) -> list[tuple[float, float]]:
    """(fractional epoch, B_simple) of each step record that holds a resolved noise scale."""
    return [(s.epoch, s.noise_scale) for s in log.steps if s.noise_scale is not None]


def noise_between(curve: Sequence[tuple[float, float]], first_epoch: float, last_epoch: float) -> float | None:
    """The median B_simple logged in epochs (first_epoch, last_epoch]: each logged value is a moving average
    of about 20 measurements, which late in training, with |G|^2 small, still jumps by tenfold now and then."""
    values = [b for e, b in curve if first_epoch < e <= last_epoch]
    return statistics.median(values) if values else None


def final_error(curve: list[dict], mode: Mode) -> float | None:
    """The paper's error of a run: the median validation top-1 error of its last epochs (5 of 90 in
    the paper, the same share here); None until the run has finished them."""
    last = [e["val_top1_error"] for e in curve if e["epoch"] > mode.epochs - mode.error_epochs]
    if not curve or curve[-1]["epoch"] != mode.epochs or len(last) < mode.error_epochs or None in last:
        return None
    return statistics.median(last)


def collect(mode_name: str, runs: Sequence[Run]) -> list[dict]:
    """One record per run from its metrics.jsonl: setting, seed, kn, k, n, eta, updates per epoch, error, the
    per-epoch curve, and the measured noise scale (median B_simple over the first epoch and over the last)."""
    mode = MODES[mode_name]
    records = []
    for run in runs:
        log = read_log(run)
        curve, noise = epoch_curve(log), noise_curve(log)
        times = [r.time for r in (*log.starts, *log.steps, *log.epochs) if r.time is not None]
        cfg = run.config
        records.append({
            "name": run.name, "setting": asdict(run.setting), "seed": run.seed,
            "global_batch_size": run.setting.global_batch_size, "bn_group_size": cfg.model.bn_group_size,
            "bn_groups": run.setting.global_batch_size // cfg.model.bn_group_size,
            "peak_lr": cfg.schedule().peak_lr,
            "updates_per_epoch": log.header.updates_per_epoch if log.header else None,
            "error": final_error(curve, mode), "train_s": max(times) - min(times) if times else None,
            "b_simple_early": noise_between(noise, 0, 1),
            "b_simple_late": noise_between(noise, mode.epochs - 1, mode.epochs),
            "epochs": curve, "noise_scale": noise})
    return records


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    return (statistics.fmean(values) if values else None, statistics.stdev(values) if len(values) > 1 else None)


def summarise(records: Sequence[dict]) -> dict[str, dict]:
    """Per setting: mean and sample std of the run errors over seeds (the paper's mean +- std), the mean
    per-epoch training and validation error curves, and the mean measured B_simple early and late."""
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
        mean, std = _mean_std(errors)
        out[name] = {"setting": first["setting"], "global_batch_size": first["global_batch_size"],
                     "bn_group_size": first["bn_group_size"], "bn_groups": first["bn_groups"],
                     "peak_lr": first["peak_lr"], "updates_per_epoch": first["updates_per_epoch"],
                     "seeds": len(errors), "mean": mean, "std": std, "curves": curves}
        for when in ("early", "late"):
            measured = [r[f"b_simple_{when}"] for r in finished if r.get(f"b_simple_{when}") is not None]
            out[name][f"b_simple_{when}"] = statistics.fmean(measured) if measured else None
    return out


def error_cell(s: dict) -> str:
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


def kn_label(kn: int) -> str:
    return f"{kn // 1024}k" if kn >= 1024 and kn % 1024 == 0 else str(kn)


def table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    def row(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [row(header), row(["---"] * len(header)), *(row(r) for r in rows)]


def updates_cell(s: dict) -> str:
    return "?" if s["updates_per_epoch"] is None else str(s["updates_per_epoch"])


def table1_lines(mode: Mode, summary: dict[str, dict]) -> list[str]:
    """The paper's Table 1 at the mode's large kn, ours beside its numbers."""
    large = summary[Setting(mode.large_kn).name]
    lines = [f"### Table 1 analog: warmup at {at_large_kn(mode, large)}", ""]
    rows = []
    for label, setting, paper in (
        (f"baseline kn={mode.baseline_kn}", Setting(mode.baseline_kn), "baseline"),
        ("no warmup", Setting(mode.large_kn, warmup="none"), "none"),
        ("constant warmup", Setting(mode.large_kn, warmup="constant"), "constant"),
        ("gradual warmup", Setting(mode.large_kn, warmup="gradual"), "gradual"),
    ):
        s = summary[setting.name]
        mean, std = PAPER_TABLE1[paper]
        rows.append([label, s["bn_groups"], s["bn_group_size"], s["global_batch_size"], f"{s['peak_lr']:g}",
                     updates_cell(s), error_cell(s), f"{mean:.2f} ± {std:.2f}"])
    return lines + table(["setting", "k", "n", "kn", "η", "updates/epoch", "top-1 error (%)", "paper (%)"], rows)


def at_large_kn(mode: Mode, large: dict) -> str:
    return (f"kn = {mode.large_kn}, {updates_cell(large)} updates per epoch (the paper's: kn = 8k, "
            f"{IMAGENET_TRAIN_IMAGES // PAPER_TABLE1_KN} updates per epoch)")


def markdown_tables(mode: Mode, summary: dict[str, dict]) -> list[str]:
    """The paper's three tables (Table 1, error against kn, ablations), ours beside its numbers."""
    lines = table1_lines(mode, summary)
    lines += ["", "### Error against kn (gradual warmup, linear scaling)", ""]
    rows = []
    for kn in mode.sweep_kn:
        s = summary[Setting(kn).name]
        equivalent = paper_kn_at(s["updates_per_epoch"])
        rows.append([kn, s["bn_groups"], f"{s['peak_lr']:g}", updates_cell(s), error_cell(s),
                     f"{kn_label(equivalent)}: {PAPER_ERROR_BY_KN[equivalent]:.2f}" if equivalent
                     else "outside the paper's range"])
    lines += table(["kn", "k", "η", "updates/epoch", "top-1 error (%)",
                    "paper at the kn with as many updates/epoch (%)"], rows)
    if not mode.ablations:
        return lines
    large = summary[Setting(mode.large_kn).name]
    lines += ["", f"### Ablations at {at_large_kn(mode, large)}", ""]
    labels = {"no_scaling": ("no LR scaling", Setting(mode.large_kn, scaling="none")),
              "sqrt_scaling": ("square-root scaling", Setting(mode.large_kn, scaling="sqrt")),
              "gamma_one": ("gamma = 1 init", Setting(mode.large_kn, zero_gamma=False))}
    rows = [["linear scaling, zero-gamma (reference)", f"{large['peak_lr']:g}", error_cell(large),
             f"{PAPER_ERROR_BY_KN[PAPER_TABLE1_KN]:.2f}"]]
    for ablation in mode.ablations:
        label, setting = labels[ablation]
        s = summary[setting.name]
        rows.append([label, f"{s['peak_lr']:g}", error_cell(s), f"{PAPER_ABLATIONS[ablation]:.2f}"])
    return lines + table(["setting", "η", "top-1 error (%)", "paper (%)"], rows)


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
    left.set_xticks(list(mode.sweep_kn), [kn_label(kn) for kn in mode.sweep_kn])
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


def provenance_lines(mode_name: str, provenance: dict) -> list[str]:
    mode, p = MODES[mode_name], provenance
    return [f"Command: `{p['command']}`  ", f"Machine: {p['machine']}  ",
            f"Date: {p['date']}; " + (f"wall time {p['duration_s'] / 60:.1f} min with {p['jobs']} runs at once, "
                                     if p["duration_s"] is not None else "")
            + f"training time of all runs together {p['train_s'] / 60:.1f} min  ",
            f"Versions: {', '.join(f'{k} {v}' for k, v in p['versions'].items() if v)}", "",
            f"Scale ({mode.description}): {p['scale']}", "",
            f"Each cell is the mean ± sample std over seeds of a run's error, the median top-1 validation error "
            f"of its last {mode.error_epochs} epoch(s) (the paper: last 5 of 90).", ""]


def write_results_json(mode_name: str, records: Sequence[dict], out_dir: Path, provenance: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.json"
    results.write_text(json.dumps({"mode": mode_name, "scale": asdict(MODES[mode_name]), "provenance": provenance,
                                   "runs": list(records)}, indent=1) + "\n")
    return results


def write_report(mode_name: str, records: Sequence[dict], out_dir: Path, provenance: dict) -> list[Path]:
    """results.json (every run's recorded errors), results.md (the tables) and the figures, from `records`."""
    mode = MODES[mode_name]
    if len(mode.sweep_optimizers) > 1:
        from .scaling import write_scaling_report

        return write_scaling_report(mode_name, records, out_dir, provenance)
    summary = summarise(records)
    results = write_results_json(mode_name, records, out_dir, provenance)
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
    lines = [f"# Replication, {mode_name} mode", "", *provenance_lines(mode_name, provenance),
             *markdown_tables(mode, summary), "",
             "![error against kn](error_vs_kn.png)", "", "![warmup curves](curves_warmup.png)", "",
             "![curves against kn](curves_kn.png)", ""]
    report = out_dir / "results.md"
    report.write_text("\n".join(lines))
    return [results, report, *figures]


def describe_scale(mode_name: str, runs: Sequence[Run]) -> str:
    mode = MODES[mode_name]
    cfg = runs[0].config
    g, m = cfg.data.generate, cfg.model
    widths = "x".join(str(c) for c in m.kwargs.get("channels", ())) or "default"
    optimizers = " and ".join(mode.sweep_optimizers)
    return (f"{g.num_classes} generated classes (difficulty {g.difficulty:g}), {g.num_classes * g.train_per_class} "
            f"training and {g.num_classes * g.val_per_class} validation {g.image_width}x{g.image_height} JPEGs, "
            f"{cfg.data.image_size} px crops; timm {m.name} (channels {widths}); BN over n = {m.bn_group_size} at "
            f"every kn; eta = {cfg.optim.base_lr:g} x kn / {cfg.optim.base_batch_size}; {mode.epochs} epochs, x0.1 at "
            f"{_listing(mode.milestones)}, warmup {mode.warmup_epochs:g} epoch(s) from eta = {cfg.optim.base_lr:g}; "
            f"{optimizers}; seeds {_listing(sorted({r.seed for r in runs}))}")
