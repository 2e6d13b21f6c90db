"""End-to-end training throughput of `goyal-train` on generated JPEGs, and the share of data wait.

Runs `goyal-train` (default recipe recipes/resnet50_kn256.yaml) as a subprocess on a generated
ImageNet-format JPEG folder (default 500x375, quality 90) with `run.max_updates` = warmup +
repeats x updates, a step record per update (`run.log_every_updates=1`) and no evaluation. From
the run's `metrics.jsonl` step records (`images_per_s`, `step_s`, `data_wait_s`: means over the
trainer's sliding window of --meter-window updates) the per-update step and data-wait times are
recovered exactly; the first --warmup updates (start-up, compilation, worker start) are dropped
and the rest are cut into --repeats consecutive windows of --updates updates. Per window:
img/s = images / time, data share = data wait / step time.

    python benchmarks/bench_train.py --quick --device cpu
    python benchmarks/bench_train.py --precision bf16 --channels-last --compile --workers 12
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from goyal_recipe.records import StepRecord, read_run

QUICK = dict(model="resnet10t", image_size=32, batch_size=16, global_batch_size=None, bn_group_size=8, workers=1,
             classes=4, per_class=16, warmup=1, repeats=2, updates=1)


def parse(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    common.add_jpeg_data_args(p)
    p.add_argument("--recipe", type=Path, default=common.REPO / "recipes" / "resnet50_kn256.yaml")
    p.add_argument("--model", default="resnet50", help="model.name")
    p.add_argument("--image-size", type=int, default=224, help="data.image_size")
    p.add_argument("--batch-size", type=int, default=256, help="batch.per_device_batch_size")
    p.add_argument("--global-batch-size", type=int, default=None, help="batch.global_batch_size (default: "
                                                                          "batch size x processes)")
    p.add_argument("--bn-group-size", type=int, default=32, help="model.bn_group_size")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data.workers")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="model.precision")
    p.add_argument("--channels-last", action="store_true", help="model.channels_last=true")
    p.add_argument("--compile", action="store_true", help="model.compile=true")
    p.add_argument("--updates", type=int, default=10, help="updates per timed window (one repeat)")
    p.add_argument("--processes", type=int, default=1, help="processes the --launch command starts")
    p.add_argument("--launch", default=None, help="launcher prefix instead of the goyal-train script, e.g. "
                   "'accelerate launch --config_file accelerate_configs/gpu_8.yaml' (give --processes too)")
    p.add_argument("--override", action="append", default=[], help="extra key.sub=value for goyal-train")
    p.add_argument("--meter-window", type=int, default=50, help="the trainer's ThroughputMeter window")
    p.add_argument("--run-dir", type=Path, default=None, help="keep the run here (default: a temporary directory)")
    p.set_defaults(warmup=10, per_class=None)
    args = common.parse_args(p, QUICK, argv)
    args.global_batch_size = args.global_batch_size or args.batch_size * args.processes
    args.max_updates = args.warmup + args.repeats * args.updates
    if args.per_class is None:  # enough images for every update inside the first epoch
        args.per_class = -(-args.max_updates * args.global_batch_size // args.classes)
    if args.classes * args.per_class < args.max_updates * args.global_batch_size:
        print(f"warning: {args.classes * args.per_class} images are fewer than {args.max_updates} updates x "
              f"{args.global_batch_size}: epoch ends (checkpoint, loader restart) fall inside the measurement",
              file=sys.stderr)
    return args


def train_command(args, data_root: Path, output_dir: Path) -> list[str]:
    overrides = {
        "run.name": "bench_train", "run.output_dir": output_dir, "run.resume": "none", "run.log_every_updates": 1,
        "run.plots": "false", "run.eval_every_epochs": 0, "run.max_updates": args.max_updates,
        "run.checkpoint_every_updates": 0,
        "data.source": "imagefolder", "data.root": data_root, "data.generate": "null",
        "data.image_size": args.image_size, "data.workers": args.workers,
        "model.name": args.model, "model.bn_group_size": args.bn_group_size, "model.precision": args.precision,
        "model.channels_last": str(args.channels_last).lower(), "model.compile": str(args.compile).lower(),
        "batch.global_batch_size": args.global_batch_size, "batch.per_device_batch_size": args.batch_size,
    }
    items = [f"{k}={v}" for k, v in overrides.items()] + list(args.override)
    if args.launch:
        return [*shlex.split(args.launch), "-m", "goyal_recipe.cli", "train", str(args.recipe), *items]
    script = Path(sys.executable).parent / "goyal-train"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "goyal_recipe.cli", "train"]
    return [*head, str(args.recipe), *items]


def run_training(args, data_root: Path, output_dir: Path) -> tuple[Path, float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = train_command(args, data_root, output_dir)
    print("$", shlex.join(cmd), file=sys.stderr)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=common.REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"goyal-train exited with {proc.returncode}")
    return output_dir / "bench_train" / "metrics.jsonl", wall


def per_update(window_means: list[float], window: int) -> list[float]:
    """Per-update values from sliding-window means logged after every update (u = 1, 2, ...)."""
    values: list[float] = []
    previous = 0.0
    for u, mean in enumerate(window_means, start=1):
        total = mean * min(u, window)
        value = total - previous + (values[u - 1 - window] if u > window else 0.0)
        values.append(max(value, 0.0))
        previous = total
    return values


def step_series(metrics: Path, window: int) -> tuple[list[float], list[float], list[StepRecord]]:
    records = read_run(metrics).steps
    updates = [r.update for r in records]
    if updates != list(range(1, len(records) + 1)):
        raise SystemExit(f"{metrics}: expected a step record for every update 1..N, got updates {updates[:10]}...")
    return (per_update([r.step_s for r in records], window), per_update([r.data_wait_s for r in records], window),
            records)


def main(argv=None):
    args = parse(argv)
    data_root = common.ensure_jpeg_data(args)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        out = args.run_dir or Path(tmp)
        metrics, wall = run_training(args, data_root, out)
        step_s, wait_s, records = step_series(metrics, args.meter_window)
    if len(step_s) < args.max_updates:
        raise SystemExit(f"the run logged {len(step_s)} updates, expected {args.max_updates}")
    kn = args.global_batch_size
    windows = [range(args.warmup + r * args.updates, args.warmup + (r + 1) * args.updates)
               for r in range(args.repeats)]
    img_s = [kn * len(w) / sum(step_s[i] for i in w) for w in windows]
    share = [100 * sum(wait_s[i] for i in w) / sum(step_s[i] for i in w) for w in windows]
    step_ms = [1e3 * sum(step_s[i] for i in w) / len(w) for w in windows]
    wait_ms = [1e3 * sum(wait_s[i] for i in w) / len(w) for w in windows]
    variant = {"img_per_s": common.summary(img_s), "data_wait_pct": common.summary(share),
               "step_ms": common.summary(step_ms), "data_wait_ms": common.summary(wait_ms)}
    derived = {"run_wall_s": wall, "updates_logged": len(step_s),
               "trainer_images_per_s_last_record": records[-1].images_per_s}
    record = common.make_record(common.script_name(__file__), args, {"goyal_train": variant}, derived,
                                {"data_dir": str(data_root), "recipe": str(args.recipe)})
    print(common.header(record))
    common.print_table(
        f"goyal-train {args.model} {args.image_size}px kn {kn} ({args.batch_size} per device) {args.precision}"
        f"{' channels_last' if args.channels_last else ''}{' compile' if args.compile else ''}, {args.workers} "
        f"workers: median [min, max] of {args.repeats} windows x {args.updates} updates after {args.warmup}",
        ["run", "img/s", "step ms", "data wait ms", "data wait % of step"],
        [["goyal-train", common.spread(variant["img_per_s"]), common.spread(variant["step_ms"], "{:.1f}"),
          common.spread(variant["data_wait_ms"], "{:.1f}"), common.spread(variant["data_wait_pct"])]])
    print(f"whole subprocess: {wall:.1f} s for {len(step_s)} updates (start-up, warmup and final checkpoint included)")
    common.finish(record, args.results)


if __name__ == "__main__":
    main()
