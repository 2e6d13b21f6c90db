"""Plots of a run's ``metrics.jsonl``: error vs epoch, LR schedule, training loss, overlays.

Matplotlib is imported inside the functions and figures are drawn on an Agg canvas directly
(no pyplot, no global backend switch), so importing this module is cheap and plotting works on
headless machines and next to an interactive session.

    goyal-plot runs/kn256                 # runs/kn256/plots/{error,lr,loss,noise_scale}.png
    goyal-plot runs/kn256 runs/kn8k       # runs/kn256/plots/overlay.png (the paper's Figure 2)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from goyal_recipe.records import RunRecord, read_run

__all__ = ["NothingToPlotError", "RunCurves", "figure_axes", "load_curves", "plot_run", "plot_overlay", "plot_main",
           "save_figure"]

Points = list[tuple[float, float]]


class NothingToPlotError(ValueError):
    """The metrics file holds no record that can be drawn."""


@dataclass
class RunCurves:
    """The curves of one run, each a list of ``(x, y)`` points sorted by x.

    ``lr``, ``loss`` and ``noise_scale`` (B_simple, images) come from step records (x = fractional
    epoch); ``train_error`` and ``val_error`` (top-1 error, percent) from epoch records (x = epochs completed).
    """

    path: Path
    name: str
    global_batch_size: int | None = None
    header: RunRecord | None = None
    """The run's first start record."""
    lr: Points = field(default_factory=list)
    loss: Points = field(default_factory=list)
    train_error: Points = field(default_factory=list)
    val_error: Points = field(default_factory=list)
    noise_scale: Points = field(default_factory=list)

    @property
    def updates_per_epoch(self) -> int | None:
        return self.header.updates_per_epoch if self.header else None

    @property
    def label(self) -> str:
        kn = "?" if self.global_batch_size is None else self.global_batch_size
        return f"{self.name} (kn={kn})"


def _points(records: Sequence[Any], x: str, y: str) -> Points:
    return [(float(getattr(r, x)), float(getattr(r, y))) for r in records
            if getattr(r, x) is not None and getattr(r, y) is not None]


def load_curves(run_dir: str | Path) -> RunCurves:
    """Read ``run_dir/metrics.jsonl`` into curves, through :func:`goyal_recipe.records.read_run` (a
    resumed run's repeated update or epoch: the last record wins).

    Raises ``FileNotFoundError`` for a missing directory or file and :class:`NothingToPlotError` when
    the file has no step or epoch record (empty, or only a header).
    """
    run_dir = Path(run_dir)
    log = read_run(run_dir)
    if not log.steps and not log.epochs:
        raise NothingToPlotError(f"{log.path} has no step or epoch records to plot")
    header = log.header
    return RunCurves(
        path=log.path,
        name=str(header and header.name or run_dir.resolve().name),
        global_batch_size=header and header.global_batch_size,
        header=header,
        lr=_points(log.steps, "epoch", "lr"),
        loss=_points(log.steps, "epoch", "loss"),
        train_error=_points(log.epochs, "epoch", "train_top1_error"),
        val_error=_points(log.epochs, "epoch", "val_top1_error"),
        noise_scale=_points(log.steps, "epoch", "noise_scale"),
    )


def figure_axes(ncols: int = 1, figsize: tuple[float, float] = (7, 4.5)) -> tuple[Any, list[Any]]:
    """A figure on an Agg canvas with `ncols` gridded axes side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def save_figure(fig: Any, axes: Sequence[Any], path: Path, legend_fontsize: float | None = None) -> Path:
    """Legends where there are labelled lines, then the PNG (its directory made if needed)."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_fontsize)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _axes(xlabel: str, ylabel: str, title: str) -> tuple[Any, Any]:
    fig, (ax,) = figure_axes()
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path) -> Path:
    return save_figure(fig, [ax], path)


def _draw_error(ax: Any, curves: RunCurves, label: str | None = None, color: str | None = None) -> None:
    """Training error dashed, validation error solid with markers (the paper's figures)."""
    prefix = f"{label} " if label else ""
    for points, name, style in ((curves.train_error, "train", "--"), (curves.val_error, "val", "-o")):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, color=color, markersize=3, label=f"{prefix}{name}")


def _draw_line(curves: RunCurves, points: Points, ylabel: str, path: Path) -> Path:
    fig, ax = _axes("epochs", ylabel, curves.label)
    xs, ys = zip(*points)
    ax.plot(xs, ys)
    return _save(fig, ax, path)


def schedule_points(run_dir: str | Path, updates_per_epoch: int | None) -> Points:
    """The LR of every update from the run's resolved `config.yaml` (empty if it is absent)."""
    from goyal_recipe.config import load_config

    config = Path(run_dir) / "config.yaml"
    if not config.is_file() or not updates_per_epoch:
        return []
    schedule = load_config(config).schedule()
    total = round(schedule.epochs * updates_per_epoch)
    return [(t / updates_per_epoch, schedule.lr(t / updates_per_epoch)) for t in range(total)]


def _draw_lr(curves: RunCurves, schedule: Points, path: Path) -> Path:
    """The schedule per update as a line, the logged LRs (those really used) as dots on it."""
    fig, ax = _axes("epochs", "learning rate", curves.label)
    if schedule:
        ax.plot(*zip(*schedule), label="schedule")
    # A logged LR is that of update t (1-based), which starts at fractional epoch (t - 1) / U.
    shift = 1 / curves.updates_per_epoch if schedule else 0.0
    ax.plot([x - shift for x, _ in curves.lr], [y for _, y in curves.lr], ".", markersize=4,
            label="logged updates" if schedule else None)
    return _save(fig, ax, path)


def _draw_noise_scale(curves: RunCurves, path: Path) -> Path:
    """B_simple over training (log scale) with the run's kn as a horizontal line: where the curve lies
    above the line, kn is below the critical batch it approximates (McCandlish et al. 2018)."""
    fig, ax = _axes("epochs", "gradient noise scale B_simple (images)", curves.label)
    xs, ys = zip(*curves.noise_scale)
    ax.plot(xs, ys, ".-", markersize=3, label="measured B_simple")
    if curves.global_batch_size:
        ax.axhline(curves.global_batch_size, color="C3", linestyle="--", label=f"kn = {curves.global_batch_size}")
    ax.set_yscale("log")
    return _save(fig, ax, path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``error.png`` (top-1 error % vs epoch), ``lr.png`` (LR vs fractional epoch) and
    ``loss.png`` (training loss vs fractional epoch) into ``out_dir`` (``run_dir/plots``), and
    ``noise_scale.png`` (B_simple vs fractional epoch, kn as a line) when the run measured it.

    A plot whose records are absent is skipped (no epoch finished yet: no ``error.png``; no
    validation: training error only). Returns the paths written.
    """
    curves = load_curves(run_dir)
    out = Path(run_dir) / "plots" if out_dir is None else Path(out_dir)
    written = []
    if curves.train_error or curves.val_error:
        fig, ax = _axes("epochs", "top-1 error (%)", curves.label)
        _draw_error(ax, curves)
        written.append(_save(fig, ax, out / "error.png"))
    if curves.lr:
        written.append(_draw_lr(curves, schedule_points(run_dir, curves.updates_per_epoch), out / "lr.png"))
    if curves.loss:
        written.append(_draw_line(curves, curves.loss, "training loss", out / "loss.png"))
    if curves.noise_scale:
        written.append(_draw_noise_scale(curves, out / "noise_scale.png"))
    if not written:
        raise NothingToPlotError(f"{curves.path} has no error, LR or loss values to plot")
    return written


def plot_overlay(
    run_dirs: Sequence[str | Path],
    out_path: str | Path,
    labels: Sequence[str] | None = None,
) -> Path:
    """Training (dashed) and validation (solid) top-1 error vs epoch of several runs in one
    figure, one colour per run; labels default to ``"<name> (kn=<global_batch_size>)"``."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"plot_overlay: {len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_curves(d) for d in run_dirs]
    if not any(c.train_error or c.val_error for c in runs):
        raise NothingToPlotError(
            "no epoch records to plot in " + ", ".join(str(c.path) for c in runs)
        )
    fig, ax = _axes("epochs", "top-1 error (%)", "top-1 error vs epochs")
    for i, curves in enumerate(runs):
        _draw_error(ax, curves, labels[i] if labels else curves.label, color=f"C{i % 10}")
    return _save(fig, ax, Path(out_path))


def plot_main(argv: Sequence[str] | None = None) -> int:
    """``goyal-plot RUN_DIR [RUN_DIR ...] [--out PATH]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="goyal-plot",
        description="Plot error, LR and loss curves of a run, or overlay the error curves of several runs.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument(
        "--out",
        type=Path,
        help="one run: directory for its plots (default RUN_DIR/plots); "
        "several runs: overlay image (default FIRST_RUN_DIR/plots/overlay.png)",
    )
    parser.add_argument(
        "--label", action="append", dest="labels", help="legend label of each run in order (overlay only)"
    )
    args = parser.parse_args(argv)
    try:
        if len(args.run_dirs) == 1:
            paths = plot_run(args.run_dirs[0], args.out)
        else:
            out = args.out or args.run_dirs[0] / "plots" / "overlay.png"
            paths = [plot_overlay(args.run_dirs, out, args.labels)]
    except (OSError, ValueError) as err:  # missing files, nothing to plot, malformed log
        message = " ".join(str(err).split())
        print(f"goyal-plot: error: {message}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(plot_main())
