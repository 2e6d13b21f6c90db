"""What `goyal-plan` reads from the user's own runs and models: the gradient noise scale a run measured and what
it says about growing kn, a model's parameter count, and a throughput measured by `benchmarks/bench_step.py`.
The cost model they feed is `goyal_recipe.plan`."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .plan import RESNET50_PARAMETERS, PlanError
from .records import METRICS_FILE, read_run


# ------------------------------------------------------------------------------------------------
# the critical batch (McCandlish et al. 2018, arXiv 1812.06162)


def updates_over_minimum(global_batch_size: float, noise_scale: float) -> float:
    """S / S_min = 1 + B_noise / B (their eq. 2.11): updates to a given loss against the fewest possible."""
    return 1 + noise_scale / global_batch_size


def updates_saved_by_doubling(global_batch_size: float, noise_scale: float) -> float:
    """Share of updates a 2x larger kn saves: B_noise / (2 (B + B_noise)); 1/2 far below B_noise, 1/4 at it."""
    return noise_scale / (2 * (global_batch_size + noise_scale))


@dataclass(frozen=True)
class NoiseScaleReading:
    noise_scale: float
    """B_simple in images: median over the last half of the step records that carry one."""
    records_used: int
    records_with_noise_scale: int
    path: Path


def read_noise_scale(run_dir: str | Path) -> NoiseScaleReading | None:
    """The run's measured gradient noise scale, or None when its step records carry none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PlanError(f"{path} not found; pass --run-dir a run directory written by goyal-train")
    try:
        steps = read_run(path).steps
    except ValueError as e:  # a line that is not JSON, or not a record
        raise PlanError(f"{e}; pass the metrics.jsonl of a goyal-train run") from None
    values = [float(r.noise_scale) for r in steps
              if isinstance(r.noise_scale, (int, float)) and math.isfinite(r.noise_scale)]
    if not values:
        return None
    late = values[len(values) // 2:]  # B_simple grows as the loss falls; the late value sets the limit
    return NoiseScaleReading(statistics.median(late), len(late), len(values), path)


# ------------------------------------------------------------------------------------------------
# inputs


def parameter_count(model: str) -> int:
    """A number ("25557032", "25.6e6") or a timm model name (built without weights to count them)."""
    try:
        count = float(model)
    except ValueError:
        pass
    else:
        if count < 1 or count != int(count):
            raise PlanError(f"--model {model}: a parameter count must be a positive whole number")
        return int(count)
    if model == "resnet50":
        return RESNET50_PARAMETERS
    import timm

    try:
        net = timm.create_model(model, pretrained=False)
    except RuntimeError as e:
        raise PlanError(f"--model {model}: {e}; pass a timm model name or a parameter count") from None
    return sum(p.numel() for p in net.parameters())


def throughput_from_bench(path: str | Path, variant: str = "trainer") -> tuple[float, int, str, str]:
    """(img/s, per-GPU batch, model, where and when) of the newest `benchmarks/bench_step.py` record."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path} not found; run benchmarks/bench_step.py on the GPU to plan for (it appends "
                        "to benchmarks/results/bench_step.jsonl)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("benchmark") == "bench_step"]
    if not records:
        raise PlanError(f"{path} holds no bench_step record; pass the file benchmarks/bench_step.py wrote")
    last = records[-1]
    gpu = (last.get("machine") or {}).get("gpu")
    where = f"bench_step on {gpu['name'] if gpu else 'a CPU'}, {str(last.get('date', 'undated'))[:10]}"
    try:
        return (last["variants"][variant]["img_per_s"]["median"], int(last["settings"]["batch_size"]),
                str(last["settings"]["model"]), where)
    except KeyError as e:
        raise PlanError(f"{path}: the newest bench_step record lacks {e}; rerun benchmarks/bench_step.py") from None
