"""End to end against timm's train.py: the same generated data and recipe, alternating, one run at a time.

Runs `goyal-train` on a recipe and timm's own `train.py` (pytorch-image-models, given with
--timm-train PATH; it is not part of this project) with the closest flags, on the same generated
ImageNet-layout JPEG folders (`<data>/train/<synset>/*.JPEG`, `<data>/val/<synset>/*.JPEG`, which timm
reads with `--data-dir <data> --train-split train --val-split val`), --repeats times each, alternating
which goes first. Per run it measures, from the programs' own logs:

- steady-state img/s over updates --warmup+1 .. --warmup+--updates (default 21-170): images / the sum
  of the per-update times (each from the end of the previous update to the end of this one, so data
  waits and per-update logging are in; evaluation and checkpoints between epochs are not), and the
  share of that time spent waiting for data;
- wall time of the whole process, start-up (process start to the first update's log line) and the end
  (the last evaluation's line to the process exit: final checkpoint, exports, plots);
- peak RSS of the main process (its VmHWM, the kernel's high-water mark) and of the process tree (the
  largest sum of the main process's and its loader workers' RSS over polls every --poll-s seconds);
- the final validation top-1 error.

goyal-train's per-update times come from its metrics.jsonl step records (one per update; the sliding
window means are inverted as in bench_train.py); timm's from its `Train:` lines (`--log-interval 1`:
the update time of each update, and the epoch's running mean of data time, whose differences are the
data waits) and its summary.csv (eval_top1). Ratios are goyal / timm, paired per repeat.

    python benchmarks/bench_vs_timm.py --timm-train /tmp/timm_train.py --repeats 3      # the CPU quickstart job
    python benchmarks/bench_vs_timm.py --timm-train train.py --preset gpu --repeats 3   # ResNet-50 224 px bf16
    python benchmarks/bench_vs_timm.py --timm-train train.py --dry-run                  # print both commands
    python benchmarks/bench_vs_timm.py --quick --goyal-only                             # a tiny goyal-side run
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
from bench_train import step_series

from goyal_recipe.config import load_config, plan_batches
from goyal_recipe.data import generate_dataset
from goyal_recipe.metrics import ThroughputMeter
from goyal_recipe.records import read_run

# Each preset: the goyal-train recipe and overrides, and the generated data set both programs read.
PRESETS = {
    # recipes/quickstart.yaml as it is: resnet18 48 px, 10 classes, kn 128 as 2 x 64, 9 epochs, 2 workers, fp32.
    "cpu": dict(recipe="recipes/quickstart.yaml", overrides=[], data=None),
    # ResNet-50 at 224 px, bf16 autocast, channels_last, 256 per device (one process, no accumulation) on
    # ImageNet-sized JPEGs; 10,000 training images = 39 updates per epoch, 5 epochs = 195 updates.
    "gpu": dict(recipe="recipes/resnet50_kn256.yaml",
                overrides=["batch.global_batch_size=256", "batch.per_device_batch_size=256", "model.precision=bf16",
                           "model.channels_last=true", "optim.epochs=5", "optim.milestones=[3,4]",
                           "optim.warmup_epochs=1", f"data.workers={max(1, min(14, (os.cpu_count() or 2) - 2))}"],
                data=dict(num_classes=10, train_per_class=1000, val_per_class=50, image_size=(500, 375),
                          difficulty=0.5)),
    # Seconds on a CPU: what the tests run (--goyal-only).
    "quick": dict(recipe="recipes/quickstart.yaml",
                  overrides=["model.name=resnet10t", "model.bn_group_size=8", "data.image_size=32", "data.workers=1",
                             "batch.global_batch_size=16", "batch.per_device_batch_size=8", "optim.epochs=2",
                             "optim.warmup_epochs=1", "optim.milestones=[1]", "run.noise_scale=false"],
                  data=dict(num_classes=4, train_per_class=16, val_per_class=4, image_size=(40, 32), difficulty=0.5)),
}
QUICK = dict(preset="quick", warmup=2, updates=4, repeats=2)

_TIMM_TRAIN = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+) .*?Time: ([\d.]+)s, .*?Data: ([\d.]+) \(([\d.]+)\)")
_TIMM_TEST = re.compile(r"^Test: \[")
_GOYAL_STEP = re.compile(r"^epoch\s+\d+/\d+\s+step\s")
_GOYAL_EPOCH_DONE = re.compile(r"^epoch\s+(\d+)/(\d+) done")


def parse(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--timm-train", type=Path, default=None,
                   help="timm's train.py (pytorch-image-models, at the tag of the installed timm version)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: recipes/quickstart.yaml; gpu: ResNet-50 224 px bf16 channels_last 256 per device")
    p.add_argument("--updates", type=int, default=150, help="updates in the steady-state window (after --warmup)")
    p.add_argument("--override", action="append", default=[], help="extra key.sub=value for both sides' recipe")
    p.add_argument("--timm-arg", action="append", default=[], help="extra flag for timm's train.py (repeatable)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the generated data set (written if missing; default benchmarks/.cache/vs_timm_<preset>)")
    p.add_argument("--keep-runs", type=Path, default=None, help="keep each run's directory and log here")
    p.add_argument("--poll-s", type=float, default=0.1, help="seconds between memory polls")
    p.add_argument("--goyal-only", action="store_true", help="run goyal-train only (no --timm-train needed)")
    p.add_argument("--dry-run", action="store_true", help="print both commands and exit")
    p.add_argument("--side-by-side", action="store_true",
                   help="run each pair at the same time, each program (and its loader workers) pinned to its own "
                        "half of the cores, swapped every repeat, with OMP_NUM_THREADS = that half: on a machine "
                        "whose speed drifts between runs, both then see the same machine")
    p.set_defaults(warmup=20, repeats=3)
    args = common.parse_args(p, QUICK, argv)
    if not (args.goyal_only or args.timm_train):
        p.error("--timm-train PATH is required (timm's train.py; see benchmarks/README.md), or give --goyal-only")
    if args.timm_train and not args.timm_train.is_file():
        p.error(f"--timm-train {args.timm_train}: no such file; get train.py from the pytorch-image-models "
                "repository at the installed timm version (benchmarks/README.md)")
    return args


# ----------------------------------------------------------------------------------------------
# the job: one recipe, and the timm flags closest to it


def recipe_config(args, data_root: Path):
    preset = PRESETS[args.preset]
    return load_config(common.REPO / preset["recipe"],
                       [*preset["overrides"], *args.override, f"data.root={data_root}", "data.generate=null"])


def data_spec(args) -> dict:
    """generate_dataset's arguments for the preset (the recipe's data.generate where the preset gives none)."""
    preset = PRESETS[args.preset]
    if preset["data"] is not None:
        return preset["data"]
    gen = load_config(common.REPO / preset["recipe"]).data.generate
    return dict(num_classes=gen.num_classes, train_per_class=gen.train_per_class, val_per_class=gen.val_per_class,
                image_size=(gen.image_width, gen.image_height), difficulty=gen.difficulty, seed=gen.seed)


def data_path(args) -> Path:
    return Path(args.data_dir or common.CACHE_DIR / f"vs_timm_{args.preset}")


def ensure_data(args) -> Path:
    """The preset's generated JPEG folders, written if missing."""
    root = data_path(args)
    done = generate_dataset(root, formats=("jpeg",), **data_spec(args))
    if done["generated"]:
        print(f"generated {root} ({done['seconds']:.1f} s)", file=sys.stderr)
    return root


def goyal_command(args, data_root: Path, run_root: Path) -> list[str]:
    preset = PRESETS[args.preset]
    items = [*preset["overrides"], *args.override,
             "run.name=run", f"run.output_dir={run_root}", "run.resume=none", "run.log_every_updates=1",
             f"data.root={data_root}", "data.generate=null"]
    script = Path(sys.executable).parent / "goyal-train"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "goyal_recipe.cli", "train"]
    return [*head, str(common.REPO / preset["recipe"]), *items]


def timm_command(args, cfg, data_root: Path, run_root: Path) -> list[str]:
    """timm train.py flags for the recipe: same model, data, batch chain, LR per update, augmentation."""
    plan = plan_batches(cfg, 1)
    schedule = cfg.schedule()
    o, d, m = cfg.optim, cfg.data, cfg.model
    if o.decay != "step" or o.warmup != "gradual" or o.optimizer != "sgd":
        raise SystemExit("bench_vs_timm maps only sgd with gradual warmup and step decay onto timm's flags")
    for name, value in (("optim.warmup_epochs", o.warmup_epochs), *(("optim.milestones", x) for x in o.milestones)):
        if value != int(value):  # timm's --warmup-epochs and --decay-milestones are whole epochs
            raise SystemExit(f"{name}={value}: timm's train.py takes whole epochs only")
    warmup_start = schedule.lr(0.0)  # the LR of the first update (base_lr, or the peak when kn is below the base)
    flags = [
        "--data-dir", str(data_root), "--train-split", "train", "--val-split", "val",
        "--model", m.name, "--num-classes", str(m.num_classes or _num_classes(args, data_root)),
        "--input-size", "3", str(d.image_size), str(d.image_size),
        "--crop-pct", f"{224 / 256}", "--interpolation", "bilinear", "--train-interpolation", "bilinear",
        "--batch-size", str(plan.per_device_batch_size), "--grad-accum-steps", str(plan.accumulation_steps),
        "--opt", "sgd" if o.nesterov else "momentum", "--momentum", str(o.momentum),
        "--weight-decay", str(o.weight_decay),
        "--sched", "multistep", "--sched-on-updates", "--lr", repr(schedule.peak_lr),
        "--warmup-lr", repr(warmup_start), "--warmup-epochs", str(int(o.warmup_epochs)),
        "--decay-milestones", *[str(int(x)) for x in o.milestones], "--decay-rate", str(o.gamma),
        "--epochs", str(o.epochs), "--cooldown-epochs", "0", "--min-lr", "0",
        "--scale", str(d.crop_min_area), "1.0", "--hflip", "0.5", "--color-jitter", str(d.color_jitter),
        "--smoothing", str(o.label_smoothing), "--reprob", "0", "--mixup", "0", "--cutmix", "0",
        "--workers", str(d.workers), "--seed", str(cfg.run.seed), "--log-interval", "1",
        "--checkpoint-hist", str(cfg.run.keep_checkpoints),
        "--output", str(run_root), "--experiment", "run",
        "--device", args.device,
    ]
    if m.precision == "bf16":
        flags += ["--amp", "--amp-dtype", "bfloat16"]
    if m.channels_last:
        flags += ["--channels-last"]
    if m.compile:
        flags += ["--torchcompile"]
    return [sys.executable, str(getattr(args, "timm_script", None) or args.timm_train), *flags, *args.timm_arg]


def _num_classes(args, root: Path) -> int:
    """The class folders of the data, or the preset's count before it is generated (--dry-run)."""
    train = root / "train"
    if train.is_dir():
        return sum(1 for x in train.iterdir() if x.is_dir())
    return data_spec(args)["num_classes"]


def portable_command(cmd: list[str], data_root: Path, run_root: Path, timm_train: Path | None,
                     scratch_script: Path | None = None) -> list[str]:
    """The command as recorded: the data, run directory and timm script as placeholders, no machine paths."""
    out = []
    for part in cmd:
        part = part.replace(str(run_root), "<run_dir>").replace(str(data_root), "<data>")
        if timm_train is not None:
            part = part.replace(str(timm_train), "<timm-train>")
        if scratch_script is not None:
            part = part.replace(str(scratch_script), "<timm-train>")
        if part == sys.executable:
            part = "python"
        out.append(common._portable(part.replace(str(common.REPO) + "/", "")))
    return out


# ----------------------------------------------------------------------------------------------
# one run: the process, its log lines with times, its memory


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _children(pid: int) -> list[int]:
    """Every descendant of pid (from /proc/<pid>/task/*/children)."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            found += kids
            stack += kids
    return found


class MemoryPoller(threading.Thread):
    """Peak RSS of a process (its VmHWM) and of its tree (largest sum of VmRSS over the polls)."""

    def __init__(self, pid: int, every_s: float):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.main_hwm_kib = self.tree_peak_kib = 0
        self.max_children = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            hwm = _status_kib(self.pid, "VmHWM")
            if hwm is not None:
                self.main_hwm_kib = max(self.main_hwm_kib, hwm)
                kids = _children(self.pid)
                self.max_children = max(self.max_children, len(kids))
                tree = sum(_status_kib(p, "VmRSS") or 0 for p in [self.pid, *kids])
                self.tree_peak_kib = max(self.tree_peak_kib, tree)
            self.done.wait(self.every_s)


def run_process(cmd: list[str], env: dict, log_path: Path, poll_s: float, cpus: set[int] | None = None) -> dict:
    """Run cmd to its end (on `cpus` only, with its children, if given); returns wall time, the (seconds, line)
    log, exit code and peak memory."""
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, preexec_fn=pin)
    poller = MemoryPoller(proc.pid, poll_s)
    poller.start()
    exited = []  # when the main process ends (its loader workers may hold the output open a little longer)
    waiter = threading.Thread(target=lambda: (proc.wait(), exited.append(time.perf_counter() - start)), daemon=True)
    waiter.start()
    lines = []
    with log_path.open("w") as log:
        for line in proc.stdout:
            t = time.perf_counter() - start
            line = line.rstrip("\n")
            # tqdm redraws share a line through carriage returns; the last state is the line
            lines.append((t, line.split("\r")[-1]))
            log.write(f"{t:9.3f} {line}\n")
    code = proc.wait()
    waiter.join()
    output_closed = time.perf_counter() - start
    poller.done.set()
    poller.join()
    return {"wall_s": exited[0], "after_exit_s": max(output_closed - exited[0], 0.0), "lines": lines,
            "returncode": code, "peak_rss_main_mib": poller.main_hwm_kib / 1024,
            "peak_rss_tree_mib": poller.tree_peak_kib / 1024, "processes": 1 + poller.max_children,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def _first(lines, pattern) -> float | None:
    return next((t for t, line in lines if pattern.search(line)), None)


def _last(lines, pattern) -> float | None:
    return next((t for t, line in reversed(lines) if pattern.search(line)), None)


def goyal_series(run_dir: Path) -> tuple[list[float], list[float], list[bool], float | None]:
    """Per-update (time, data wait, whether it is its epoch's first) from metrics.jsonl step records as
    bench_train reads them (the trainer's ThroughputMeter window), and the last epoch's val top-1 error."""
    times, waits, _ = step_series(run_dir / "metrics.jsonl", ThroughputMeter().window)
    run = read_run(run_dir)
    firsts = [i % run.header.updates_per_epoch == 0 for i in range(len(times))]
    return times, waits, firsts, run.epochs[-1].val_top1_error if run.epochs else None


def timm_series(lines: list[tuple[float, str]]) -> tuple[list[float], list[float], list[bool]]:
    """Per-update (time, data wait, whether it is its epoch's first) from timm's `Train:` lines at
    --log-interval 1.

    `Time: <val>s` is the update's own time. `Data: <val> (<avg>)` is a running mean over the epoch's
    micro-batches of accumulation x that micro-batch's wait, so after update i (0-based) of an epoch the
    waits so far sum to avg x (i + 1); the differences give each update's wait.
    """
    times, waits, firsts, last = [], [], [], {}
    for _, line in lines:
        match = _TIMM_TRAIN.search(line)
        if not match:
            continue
        epoch, index = int(match[1]), int(match[2])
        cumulative = float(match[6]) * (index + 1)
        times.append(float(match[4]))
        waits.append(max(cumulative - last.get(epoch, 0.0), 0.0))
        firsts.append(epoch not in last)
        last[epoch] = cumulative
    return times, waits, firsts


def timm_error(run_dir: Path) -> float | None:
    summary = run_dir / "summary.csv"
    if not summary.is_file():
        return None
    rows = list(csv.DictReader(summary.open()))
    return 100.0 - float(rows[-1]["eval_top1"]) if rows and rows[-1].get("eval_top1") else None


def measure(name: str, cmd: list[str], env: dict, run_root: Path, args, kn: int, cpus: set[int] | None = None) -> dict:
    run_root.mkdir(parents=True, exist_ok=True)
    where = "" if cpus is None else f" (cpus {','.join(map(str, sorted(cpus)))})"
    print(f"[{name}]{where} $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    out = run_process(cmd, env, run_root / "log.txt", args.poll_s, cpus)
    if out["returncode"] != 0:
        tail = "\n".join(line for _, line in out["lines"][-40:])
        raise SystemExit(f"{name} exited with {out['returncode']}:\n{tail}")
    lines = out["lines"]
    if name == "goyal_train":
        times, waits, firsts, error = goyal_series(run_root / "run")
        first, last_eval = _first(lines, _GOYAL_STEP), _last(lines, _GOYAL_EPOCH_DONE)
    else:
        times, waits, firsts = timm_series(lines)
        error = timm_error(run_root / "run")
        first, last_eval = _first(lines, _TIMM_TRAIN), _last(lines, _TIMM_TEST)
    lo, hi = args.warmup, args.warmup + args.updates
    if len(times) < hi:
        raise SystemExit(f"{name}: {len(times)} updates logged, the window needs {hi} (--warmup + --updates)")
    window_s = sum(times[lo:hi])
    epoch_starts = [wait for wait, first in zip(waits[lo:hi], firsts[lo:hi]) if first]
    result = {
        "img_per_s": kn * (hi - lo) / window_s,
        "data_wait_pct": 100 * sum(waits[lo:hi]) / window_s,
        "epoch_start_wait_s": statistics.mean(epoch_starts) if epoch_starts else float("nan"),
        "epoch_start_wait_pct": 100 * sum(epoch_starts) / window_s,
        "wall_s": out["wall_s"],
        "after_exit_s": out["after_exit_s"],
        "startup_s": first if first is not None else float("nan"),
        "end_s": out["wall_s"] - last_eval if last_eval is not None else float("nan"),
        "train_s": sum(times),
        "peak_rss_main_mib": out["peak_rss_main_mib"],
        "peak_rss_tree_mib": out["peak_rss_tree_mib"],
        "processes": out["processes"],
        "val_top1_error": error if error is not None else float("nan"),
        "load_before": out["load_before"], "load_after": out["load_after"],
    }
    print(f"[{name}] {result['img_per_s']:.1f} img/s, data wait {result['data_wait_pct']:.1f} %, wall "
          f"{result['wall_s']:.1f} s, peak RSS {result['peak_rss_main_mib']:.0f} MiB main / "
          f"{result['peak_rss_tree_mib']:.0f} MiB tree, val top-1 error {result['val_top1_error']:.2f} %, load "
          f"{result['load_before']:.2f} -> {result['load_after']:.2f}", file=sys.stderr, flush=True)
    return result


# ----------------------------------------------------------------------------------------------

METRICS = (("img_per_s", "steady-state img/s (updates {lo}-{hi})", "{:.1f}"),
           ("data_wait_pct", "data wait % of that time", "{:.1f}"),
           ("epoch_start_wait_pct", "of it, at epochs' first updates, %", "{:.1f}"),
           ("epoch_start_wait_s", "wait at an epoch's first update, s", "{:.3f}"),
           ("wall_s", "wall time of the run, s", "{:.1f}"),
           ("startup_s", "start to first update logged, s", "{:.1f}"),
           ("end_s", "last evaluation to exit, s", "{:.1f}"),
           ("after_exit_s", "workers' output open after the exit, s", "{:.1f}"),
           ("peak_rss_main_mib", "peak RSS main process, MiB", "{:.0f}"),
           ("peak_rss_tree_mib", "peak RSS process tree, MiB", "{:.0f}"),
           ("val_top1_error", "val top-1 error, %", "{:.2f}"))


def side_by_side(order: list[str], command, env: dict, scratch: Path, repeat: int, args, kn: int) -> dict:
    """One repeat with the programs running at once, the first of `order` on the first half of the usable cores."""
    usable = sorted(os.sched_getaffinity(0))
    half = len(usable) // 2
    if half < 1:
        raise SystemExit("--side-by-side needs at least 2 usable cores")
    halves = [set(usable[:half]), set(usable[half:2 * half])]
    env = dict(env, OMP_NUM_THREADS=str(half))
    found: dict[str, dict] = {}
    failed: list[BaseException] = []

    def run(side: str, cpus: set[int]) -> None:
        run_root = scratch / f"{side}_{repeat}"
        try:
            found[side] = measure(side, command(side, run_root), env, run_root, args, kn, cpus)
        except BaseException as e:  # SystemExit of a failed run: re-raised in the main thread
            failed.append(e)

    threads = [threading.Thread(target=run, args=(side, cpus)) for side, cpus in zip(order, halves)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        raise failed[0]
    return found


def main(argv=None):
    args = parse(argv)
    data_root = data_path(args) if args.dry_run else ensure_data(args)
    cfg = recipe_config(args, data_root)
    kn = cfg.batch.global_batch_size
    scratch = Path(tempfile.mkdtemp(prefix="bench_vs_timm_")) if args.keep_runs is None else args.keep_runs
    sides = ["goyal_train"] if args.goyal_only else ["goyal_train", "timm_train"]
    args.timm_script = None
    if args.timm_train and not args.dry_run:
        # Python puts a script's directory first on sys.path: run a copy alone in its own directory, so
        # that no file beside the given one can shadow a standard-library module.
        args.timm_script = scratch / "timm" / "train.py"
        args.timm_script.parent.mkdir(parents=True)
        shutil.copyfile(args.timm_train, args.timm_script)

    def command(side: str, run_root: Path) -> list[str]:
        return (goyal_command(args, data_root, run_root) if side == "goyal_train"
                else timm_command(args, cfg, data_root, run_root))

    commands = {side: command(side, scratch / side) for side in sides}
    if args.dry_run:
        for side, cmd in commands.items():
            print(f"{side}: {shlex.join(cmd)}")
        if args.keep_runs is None:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        if args.side_by_side:
            results_r = side_by_side(order, command, env, scratch, r, args, kn)
            for side in sides:
                results[side].append(results_r[side])
            continue
        for side in order:
            run_root = scratch / f"{side}_{r}"
            results[side].append(measure(side, command(side, run_root), env, run_root, args, kn))

    if args.keep_runs is None:
        shutil.rmtree(scratch, ignore_errors=True)
    variants = {side: {key: common.summary([x[key] for x in runs]) for key in runs[0]}
                for side, runs in results.items()}
    derived: dict = {"global_batch_size": kn, "window_updates": [args.warmup + 1, args.warmup + args.updates],
                     "load_average_1min": common.summary([x[k] for runs in results.values() for x in runs
                                                          for k in ("load_before", "load_after")])}
    if not args.goyal_only:
        for key in ("img_per_s", "wall_s", "peak_rss_main_mib", "peak_rss_tree_mib", "startup_s", "end_s"):
            derived[f"ratio_{key}"] = common.summary([g[key] / t[key] for g, t in
                                                      zip(results["goyal_train"], results["timm_train"])])
    timm_info = None
    if args.timm_train:
        timm_info = {"file": args.timm_train.name, "sha256": hashlib.sha256(args.timm_train.read_bytes()).hexdigest()}
    extra = {"data_dir": str(data_root), "timm_train": timm_info, "recipe": PRESETS[args.preset]["recipe"],
             "preset_overrides": PRESETS[args.preset]["overrides"],
             "commands": {side: portable_command(cmd, data_root, scratch / side, args.timm_train, args.timm_script)
                          for side, cmd in commands.items()}}
    record = common.make_record(common.script_name(__file__), args, variants, derived, extra)
    record["settings"]["timm_train"] = timm_info
    record["settings"].pop("timm_script", None)
    record["settings"]["keep_runs"] = None if args.keep_runs is None else "<kept>"
    print(common.header(record))
    lo, hi = args.warmup + 1, args.warmup + args.updates
    headers = ["metric", *sides] + ([] if args.goyal_only else ["goyal / timm"])
    rows = []
    for key, label, fmt in METRICS:
        row = [label.format(lo=lo, hi=hi), *(common.spread(variants[side][key], fmt) for side in sides)]
        if not args.goyal_only:
            row.append(common.spread(derived[f"ratio_{key}"], "{:.3f}") if f"ratio_{key}" in derived else "")
        rows.append(row)
    common.print_table(f"{args.preset} preset, kn {kn}: median [min, max] of {args.repeats} runs each, "
                       f"{'side by side, cores swapped' if args.side_by_side else 'alternating'}; "
                       f"load average {common.spread(derived['load_average_1min'], '{:.2f}')}", headers, rows)
    common.finish(record, args.results)


if __name__ == "__main__":
    main()
