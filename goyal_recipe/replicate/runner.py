"""Training the runs of a design: unfinished runs only, a few at a time, each a `goyal-train` process.

Each run's validated recipe is written whole to `<runs>/<mode>/recipes/<name>.yaml` and trained from
that file, so what ran is on disk beside the run. A run whose metrics already hold its final error is
skipped and an interrupted one resumes from its checkpoint (`run.resume: auto` in the base recipe),
so the same command continues a sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import dump_config
from .design import Mode, Run
from .report import epoch_curve, final_error, read_log


def recipe_path(run: Run) -> Path:
    return run.run_dir.parent / "recipes" / f"{run.name}.yaml"


def train_command(run: Run) -> list[str]:
    """Writes the run's recipe and returns the command that trains it."""
    path = recipe_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(run.config))
    return [sys.executable, "-m", "goyal_recipe.cli", "train", str(path)]


def is_finished(run: Run, mode: Mode) -> bool:
    return final_error(epoch_curve(read_log(run)), mode) is not None


def training_order(runs: Sequence[Run]) -> list[Run]:
    """Seed-major: every setting's first seed before any setting's second, so a sweep stopped part-way has
    every point of the design."""
    return [run for _, run in sorted(enumerate(runs), key=lambda item: (item[1].seed, item[0]))]


@dataclass
class _Active:
    run: Run
    process: subprocess.Popen
    log: Any
    started: float = field(default_factory=time.monotonic)


def run_all(runs: Sequence[Run], mode: Mode, jobs: int, threads_per_job: int, log_dir: Path) -> list[str]:
    """Train every unfinished run, `jobs` at a time; returns the names of runs that failed."""
    todo = [r for r in training_order(runs) if not is_finished(r, mode)]
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
                print(f"[{done}] {job.run.name}: FAILED (exit {job.process.returncode}); "
                      f"see {log_dir / job.run.name}.log", flush=True)
                continue
            error = final_error(epoch_curve(read_log(job.run)), mode)
            print(f"[{done}] {job.run.name}: top-1 error {error if error is None else f'{error:.2f}%'} "
                  f"({took:.0f} s)", flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    from .. import replicate
    from ..config import ConfigError
    from .design import MODES, build_runs
    from .report import collect, describe_scale, write_report

    parser = argparse.ArgumentParser(prog="goyal-replicate", description=replicate.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained at once (default: one per CPU core without a GPU, else 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the mode's (0 1 2)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "replication")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default docs/replication/MODE)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their settings, train nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the runs' metrics")
    args = parser.parse_args(argv)
    from ..provenance import describe_machine, machine_info, utc_now, versions

    mode = MODES[args.mode]
    runs = build_runs(args.mode, args.runs_dir, args.seeds)
    if args.dry_run:
        for run in runs:
            print(run.name, " ".join(run.setting.overrides()),
                  f"batch.per_device_batch_size={run.config.batch.per_device_batch_size}")
        print(f"{len(runs)} runs; scale: {describe_scale(args.mode, runs)}")
        return 0
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give the number of runs to train at once (1 or more)")
    machine = machine_info()
    cores = machine["usable_cores"] or 1
    jobs = args.jobs or (1 if machine["gpu"] else cores)
    start = time.time()
    failed = []
    try:
        if not args.report_only:
            from ..data.pipeline import generate_configured

            generate_configured(runs[0].config)  # once, before parallel runs
            failed = run_all(runs, mode, jobs, max(1, cores // jobs), args.runs_dir / args.mode / "logs")
        records = collect(args.mode, runs)
    except OSError as e:
        raise ConfigError(f"{e}; check the paths given by --runs-dir and --out") from None
    out_dir = args.out or Path("docs") / "replication" / args.mode
    command = "goyal-replicate " + " ".join(argv if argv is not None else sys.argv[1:])
    previous = out_dir / "results.json"
    if args.report_only and previous.is_file():  # redrawn: the provenance stays that of the training
        provenance = json.loads(previous.read_text())["provenance"]
    else:
        provenance = {"command": command.strip(), "machine": describe_machine(machine), "date": utc_now(),
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
