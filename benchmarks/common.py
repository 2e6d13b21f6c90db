"""What every benchmark script shares: flags, machine and version info, the timing loop, statistics,
the printed table and the JSON record appended to `benchmarks/results/<script>.jsonl`.

A record is one JSON object per run:

    {"benchmark": "bench_step", "date": "2025-01-01T00:00:00+00:00", "machine": {...}, "versions": {...},
     "settings": {...every flag...},
     "variants": {"<variant>": {"<metric>": {"median", "min", "max", "q1", "q3", "n", "values"}}},
     "derived": {...ratios and other numbers computed from the medians...}}

Each entry of "values" is one repeat; warmup iterations are never part of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from goyal_recipe.provenance import REPO, machine_info, utc_now, versions

RESULTS_DIR = REPO / "benchmarks" / "results"
CACHE_DIR = REPO / "benchmarks" / ".cache"  # generated JPEGs; ignored by benchmarks/.gitignore


# ----------------------------------------------------------------------------------------------
# flags


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every script takes; scripts add their size flags."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; statistics are over these")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before the repeats")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny sizes that run in seconds on a CPU (flags given "
                                                        "explicitly still win)")
    p.add_argument("--results", type=Path, default=None,
                   help="JSONL file the record is appended to (default benchmarks/results/<script>.jsonl)")
    return p


def parse_args(parser: argparse.ArgumentParser, quick: Mapping[str, object], argv: Sequence[str] | None = None):
    """Parse argv; with --quick the `quick` values replace the defaults (explicit flags still win)."""
    pre, _ = parser.parse_known_args(argv)
    if pre.quick:
        parser.set_defaults(**quick)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def script_name(file: str) -> str:
    return Path(file).stem


# ----------------------------------------------------------------------------------------------
# machine and versions


# ----------------------------------------------------------------------------------------------
# timing


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants: Mapping[str, Callable[[], object]], iters: int, warmup: int, repeats: int,
                     device: str | torch.device) -> dict[str, list[float]]:
    """Seconds per call of each variant, one value per repeat.

    Every variant first runs `warmup` untimed calls. Then each repeat times `iters` calls of every
    variant in turn (the order alternates between repeats), so slow drifts of a shared machine hit
    all variants alike and paired differences stay meaningful. The device is synchronised before
    and after each timed block.
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = variants[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            synchronize(device)
            seconds[name].append((time.perf_counter() - start) / iters)
    return seconds


# ----------------------------------------------------------------------------------------------
# statistics and records


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict:
    """Median and spread (min, max, interquartile range) of the repeats."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("no repeats to summarise")
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": _quantile(v, 0.25),
            "q3": _quantile(v, 0.75), "n": len(v), "values": [float(x) for x in values]}


def make_record(benchmark: str, args: argparse.Namespace, variants: dict, derived: dict | None = None,
                extra_settings: dict | None = None) -> dict:
    settings = {k: v for k, v in vars(args).items() if k != "results"}
    settings.update(extra_settings or {})
    settings = {k: _portable(v) for k, v in settings.items()}
    return {"benchmark": benchmark, "date": utc_now(), "machine": machine_info(), "versions": versions(),
            "settings": settings, "variants": variants, "derived": derived or {}}


def _portable(value):
    """Settings as JSON values; paths inside the repository relative to it, so records name no machine."""
    if isinstance(value, (str, Path)) and str(value).startswith(str(REPO) + "/"):
        return str(Path(value).relative_to(REPO))
    return str(value) if isinstance(value, Path) else value


def write_record(record: dict, path: Path | None) -> Path:
    path = Path(path) if path is not None else RESULTS_DIR / f"{record['benchmark']}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return path


def spread(stats: dict, fmt: str = "{:.1f}") -> str:
    """`median [min, max]` of a summary."""
    return f"{fmt.format(stats['median'])} [{fmt.format(stats['min'])}, {fmt.format(stats['max'])}]"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for row in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def header(record: dict) -> str:
    m, v = record["machine"], record["versions"]
    gpu = m["gpu"]["name"] if m["gpu"] else "no GPU"
    return (f"{record['benchmark']}  {record['date']}  {m['cpu']} ({m['usable_cores']} of {m['cores']} cores, "
            f"{m['torch_threads']} torch threads), {gpu}; torch {v['torch']} (CUDA {v['cuda']}), timm {v['timm']}, "
            f"device {record['settings'].get('device')}")


def finish(record: dict, path: Path | None) -> None:
    """Append the record and say where."""
    print(f"record appended to {write_record(record, path)}")


# ----------------------------------------------------------------------------------------------
# training updates


def add_keep_freed_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, keep freed memory in the process as goyal-train does (run.keep_freed_cpu_memory); "
                        "every variant of the process runs with it")


def apply_keep_freed_memory(args: argparse.Namespace) -> None:
    if args.keep_freed_memory and torch.device(args.device).type == "cpu":
        from goyal_recipe.cpu_memory import keep_freed_memory

        keep_freed_memory()


# ----------------------------------------------------------------------------------------------
# data


def add_jpeg_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="generated JPEG dataset (written if missing; default benchmarks/.cache/jpeg_<size>_<n>)")
    p.add_argument("--classes", type=int, default=10, help="classes of the generated dataset")
    p.add_argument("--per-class", type=int, default=100, help="training images per class")
    p.add_argument("--source-size", default="500x375", help="stored JPEG WIDTHxHEIGHT (ImageNet averages ~500x375)")
    p.add_argument("--jpeg-quality", type=int, default=90)


def ensure_jpeg_data(args: argparse.Namespace) -> Path:
    """The generated ImageNet-format JPEG folders of the flags (train/<synset>/*.JPEG), made if missing."""
    from goyal_recipe.data import generate_dataset

    width, height = (int(x) for x in args.source_size.lower().split("x"))
    root = args.data_dir or CACHE_DIR / f"jpeg_{width}x{height}_q{args.jpeg_quality}_{args.classes}x{args.per_class}"
    summary_ = generate_dataset(root, num_classes=args.classes, train_per_class=args.per_class, val_per_class=1,
                                image_size=(width, height), formats=("jpeg",), jpeg_quality=args.jpeg_quality)
    if summary_["generated"]:
        print(f"generated {args.classes * args.per_class} JPEGs of {width}x{height} in {root} "
              f"({summary_['seconds']:.1f} s)", file=sys.stderr)
    return Path(root)
