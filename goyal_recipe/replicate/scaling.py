"""The scaling study's report: error against kn for SGD and LARS with the measured noise scale, Table 1
with the paper's number of trials, and the reading, each statement decided by a stated rule.

The rules. Two means differ decisively when their gap is at least 2 standard errors of the difference,
sqrt(s_a^2 / n_a + s_b^2 / n_b) (sample std s over n seeds). SGD's error "rises" at the smallest kn from
which every larger kn is decisively above the smallest kn's error. LARS "stays flat" past a B_simple (the
early and the late, each) when none of its points there is decisively above SGD's error at the smallest kn,
the accuracy a larger kn is meant to keep. The noise scale they are set against is B_simple = tr(Sigma) / |G|^2 (McCandlish et
al. 2018, App. A.1) measured in the smallest-kn SGD runs, the median of its logged values over the first
epoch ("early") and over the last ("late"), since B_simple grows as the loss falls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..report import figure_axes, save_figure
from .design import MODES, PAPER_TABLE1, PAPER_TABLE1_RUNS, Mode, Setting
from .report import (error_cell, kn_label, plot_curves, provenance_lines, summarise, table, table1_lines,
                     updates_cell, write_results_json)

DECISIVE_Z = 2.0


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` seeds with its sample std (None with fewer than two)."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, summary: dict) -> Estimate | None:
        return None if summary["mean"] is None else cls(summary["mean"], summary["std"], summary["seeds"])


@dataclass(frozen=True)
class Comparison:
    """b - a in points, its standard error and the gap in standard errors (None without two seeds each)."""

    gap: float
    se: float | None
    z: float | None

    @property
    def verdict(self) -> str:
        if self.z is None:
            return "not decided (fewer than 2 seeds)"
        if self.z >= DECISIVE_Z:
            return "decisive"
        return "reversed, decisively" if self.z <= -DECISIVE_Z else "not decisive"


def compare(a: Estimate, b: Estimate) -> Comparison:
    """How far b's mean lies above a's, in standard errors of the difference."""
    gap = b.mean - a.mean
    if a.std is None or b.std is None:
        return Comparison(gap, None, None)
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)
    return Comparison(gap, se, gap / se if se > 0 else math.copysign(math.inf, gap) if gap else 0.0)


def rise_kn(points: Sequence[tuple[int, Estimate]]) -> int | None:
    """The smallest kn from which every larger kn's error is decisively above the smallest kn's; None if the
    largest kn is not."""
    points = sorted(points)
    base = points[0][1]
    rise = None
    for kn, estimate in reversed(points[1:]):
        z = compare(base, estimate).z
        if z is None or z < DECISIVE_Z:
            break
        rise = kn
    return rise


def _pairs(mode: Mode) -> list[tuple[str, Setting, str, Setting, str, str]]:
    """The paper's Table 1 orderings, better first: (label, setting, paper key) twice."""
    rows = {"baseline": (f"baseline kn={mode.baseline_kn}", Setting(mode.baseline_kn)),
            "gradual": ("gradual warmup", Setting(mode.large_kn)),
            "none": ("no warmup", Setting(mode.large_kn, warmup="none")),
            "constant": ("constant warmup", Setting(mode.large_kn, warmup="constant"))}
    order = [("baseline", "gradual"), ("baseline", "none"), ("baseline", "constant"), ("gradual", "none"),
             ("gradual", "constant"), ("none", "constant")]
    return [(*rows[a], a, *rows[b], b) for a, b in order]


def orderings(mode: Mode, summary: dict[str, dict]) -> list[dict]:
    """Each of the paper's Table 1 orderings (a below b): the paper's gap and ours, each in standard errors."""
    out = []
    for label_a, a, key_a, label_b, b, key_b in _pairs(mode):
        (pa, sa), (pb, sb) = PAPER_TABLE1[key_a], PAPER_TABLE1[key_b]
        paper = compare(Estimate(pa, sa, PAPER_TABLE1_RUNS), Estimate(pb, sb, PAPER_TABLE1_RUNS))
        ours_a, ours_b = Estimate.of(summary[a.name]), Estimate.of(summary[b.name])
        ours = compare(ours_a, ours_b) if ours_a and ours_b else None
        out.append({"ordering": f"{label_a} < {label_b}", "paper": paper, "ours": ours})
    return out


def _sweep(mode: Mode, summary: dict[str, dict], optimizer: str) -> list[tuple[int, Estimate]]:
    points = [(kn, Estimate.of(summary[Setting(kn, optimizer=optimizer).name])) for kn in mode.sweep_kn]
    return [(kn, e) for kn, e in points if e is not None]


def _z(c: Comparison | None) -> str:
    if c is None:
        return "not finished"
    return f"{c.gap:+.2f} ({c.z:+.1f} SE)" if c.z is not None else f"{c.gap:+.2f} (n < 2)"


def reading(mode: Mode, summary: dict[str, dict]) -> list[str]:
    """The reading, point by point, from the rules of this module."""
    base = summary[Setting(mode.baseline_kn).name]
    early, late = base["b_simple_early"], base["b_simple_late"]
    sgd, lars = _sweep(mode, summary, "sgd"), _sweep(mode, summary, "lars")
    if len(sgd) < len(mode.sweep_kn) or len(lars) < len(mode.sweep_kn) or late is None or early is None:
        return ["- Not read: the sweep has not finished every point (or no noise scale was measured)."]
    lines = []
    rise = rise_kn(sgd)
    noise = (f"B_simple of the kn = {mode.baseline_kn} SGD runs: {early:.0f} over the first epoch, "
             f"{late:.0f} over the last")
    if rise is None:
        lines.append(f"- **SGD** does not rise decisively up to kn = {mode.sweep_kn[-1]}, "
                     f"{mode.sweep_kn[-1] / late:.2g}x the late B_simple ({noise}).")
    else:
        flat = max(kn for kn, _ in sgd if kn < rise)
        inside = flat <= late <= rise
        lines.append(f"- **SGD** error rises from kn = {rise} (last kn not decisively above kn = {mode.baseline_kn}: "
                     f"{flat}); {noise}. The rise starts at {rise / late:.2g}x the late B_simple and "
                     f"{rise / early:.2g}x the early one; the late B_simple lies "
                     f"{'inside' if inside else 'outside'} [{flat}, {rise}].")
    for when, b_simple in (("early", early), ("late", late)):
        past = [(kn, e) for kn, e in lars if kn > b_simple]
        if not past:
            lines.append(f"- **LARS**: no kn of the sweep lies past the {when} B_simple ({b_simple:.0f}).")
            continue
        above = [(kn, compare(sgd[0][1], e)) for kn, e in past]
        flat_all = all(c.z is not None and c.z < DECISIVE_Z for _, c in above)
        detail = "; ".join(f"kn = {kn}: {_z(c)}" for kn, c in above)
        lines.append(f"- **LARS** past the {when} B_simple ({b_simple:.0f}), against SGD at kn = {sgd[0][0]} (the "
                     f"accuracy to keep): {detail}: {'flat' if flat_all else 'not flat'} (flat: no point decisively "
                     f"above).")
    sgd_by_kn = dict(sgd)
    versus = "; ".join(f"kn = {kn}: {_z(compare(sgd_by_kn[kn], e))}" for kn, e in lars)
    lines.append(f"- **LARS against SGD** at the same kn (LARS minus SGD): {versus}.")
    for o in orderings(mode, summary):
        paper, ours = o["paper"], o["ours"]
        lines.append(f"- Table 1, {o['ordering']}: paper {_z(paper)}, {paper.verdict}; here {_z(ours)}, "
                     f"{ours.verdict if ours else 'not finished'}.")
    return lines


def _b(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def sweep_table(mode: Mode, summary: dict[str, dict]) -> list[str]:
    rows = []
    for kn in mode.sweep_kn:
        s, lars = summary[Setting(kn).name], summary[Setting(kn, optimizer="lars").name]
        rows.append([kn, s["bn_groups"], f"{s['peak_lr']:g}", updates_cell(s), error_cell(s), error_cell(lars),
                     f"{_b(s['b_simple_early'])} / {_b(s['b_simple_late'])}",
                     f"{_b(lars['b_simple_early'])} / {_b(lars['b_simple_late'])}"])
    return table(["kn", "k", "η", "updates/epoch", "SGD top-1 error (%)", "LARS top-1 error (%)",
                  "SGD B_simple early / late", "LARS B_simple early / late"], rows)


def plot_error_and_noise(mode: Mode, summary: dict[str, dict], path: Path) -> Path:
    """Error against kn for both optimizers with the baseline's B_simple marked (left); B_simple over training of
    each SGD kn, with that kn as a dashed line of the same colour (right)."""
    fig, (left, right) = figure_axes(ncols=2, figsize=(12, 4.5))
    for optimizer, marker in (("sgd", "o"), ("lars", "s")):
        points = _sweep(mode, summary, optimizer)
        if points:
            left.errorbar([kn for kn, _ in points], [e.mean for _, e in points], yerr=[e.std or 0.0 for _, e in points],
                          marker=marker, capsize=3, label=optimizer.upper())
    base = summary[Setting(mode.baseline_kn).name]
    for when, style in (("early", ":"), ("late", "--")):
        if base[f"b_simple_{when}"] is not None:
            left.axvline(base[f"b_simple_{when}"], color="grey", linestyle=style,
                         label=f"B_simple {when} (kn={mode.baseline_kn} SGD): {base[f'b_simple_{when}']:.0f}")
    left.set(xscale="log", xlabel="kn (images per update)", ylabel="top-1 validation error (%)",
             title="error against kn, linear rule + gradual warmup")
    left.set_xticks(list(mode.sweep_kn), [kn_label(kn) for kn in mode.sweep_kn])
    left.minorticks_off()
    for i, kn in enumerate(mode.sweep_kn):
        for curve in summary[Setting(kn).name].get("noise_curves", []):
            right.plot(*zip(*curve), color=f"C{i}", alpha=0.6, linewidth=0.8)
        right.axhline(kn, color=f"C{i}", linestyle="--", linewidth=0.8, label=f"kn = {kn}")
    right.set(yscale="log", xlabel="epochs", ylabel="B_simple (images)",
              title="measured noise scale, SGD (one line per seed)")
    return save_figure(fig, [left, right], path, legend_fontsize=8)


def write_scaling_report(mode_name: str, records: Sequence[dict], out_dir: Path, provenance: dict) -> list[Path]:
    mode = MODES[mode_name]
    summary = summarise(records)
    for r in records:
        if r["error"] is not None and r["noise_scale"]:
            summary[Setting(**r["setting"]).name].setdefault("noise_curves", []).append(r["noise_scale"])
    results = write_results_json(mode_name, records, out_dir, provenance)
    figures = [plot_error_and_noise(mode, summary, out_dir / "error_vs_kn.png"),
               plot_curves(summary, [(f"kn={mode.baseline_kn}", Setting(mode.baseline_kn))]
                           + [(f"kn={mode.large_kn} {w} warmup", Setting(mode.large_kn, warmup=w))
                              for w in ("none", "constant", "gradual")],
                           f"warmup at kn={mode.large_kn} against kn={mode.baseline_kn} (paper: Fig. 2)",
                           out_dir / "curves_warmup.png")]
    order_rows = [[o["ordering"], _z(o["paper"]), o["paper"].verdict, _z(o["ours"]),
                   o["ours"].verdict if o["ours"] else "not finished"] for o in orderings(mode, summary)]
    lines = [f"# Replication, {mode_name} mode", "", *provenance_lines(mode_name, provenance),
             "### Error against kn: SGD and LARS, each with the linear rule and gradual warmup", "",
             *sweep_table(mode, summary), "", "![error against kn and the noise scale](error_vs_kn.png)", "",
             *table1_lines(mode, summary), "",
             f"### The paper's Table 1 orderings: gaps in points and in standard errors "
             f"({DECISIVE_Z:g} SE: decisive)", "",
             *table(["ordering", "paper", "paper's verdict", "here", "verdict here"], order_rows), "",
             "![warmup curves](curves_warmup.png)", "",
             "### Reading (by the rules in goyal_recipe/replicate/scaling.py)", "", *reading(mode, summary), ""]
    report = out_dir / "results.md"
    report.write_text("\n".join(lines))
    return [results, report, *figures]
