"""Console entry points: goyal-train, goyal-data, goyal-plot, goyal-replicate, goyal-plan
(and `python -m goyal_recipe.cli <command>`).

Every entry point runs through `_guarded`, the one place that turns a `UserError` (config, data,
checkpoint, launch) into one line on stderr and exit code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import sys

from .config import load_config
from .config_table import describe_config
from .errors import UserError


def _fail(program: str, message: str, every_rank: bool = False) -> int:
    """One line on stderr and exit code 2; once per launch, or from each rank where ranks see different data."""
    rank = os.environ.get("RANK", "0")
    if every_rank or rank == "0":
        where = f" (rank {rank})" if every_rank and "RANK" in os.environ else ""
        print(f"{program}: error{where}: {message}", file=sys.stderr)
    return 2


def _guarded(program: str):
    """The one place a UserError becomes one line on stderr and exit code 2, for every console script."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except UserError as e:
                from .data.sources import BadImageError

                # A bad image, or a file of one rank's checkpoint state, is found by that rank, maybe not rank 0.
                every_rank = isinstance(e, BadImageError) or getattr(e, "rank_local", False)
                return _fail(program, " ".join(str(e).split()), every_rank=every_rank)

        return run

    return wrap


@_guarded("goyal-train")
def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="goyal-train",
        description="Train a timm model with the large-minibatch recipe of Goyal et al. 2017.",
        epilog="example: goyal-train recipes/resnet50_kn8k.yaml data.root=/data/imagenet optim.warmup=constant",
    )
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, key.sub=value")
    parser.add_argument("--show-config", action="store_true",
                        help="print every key with its resolved value, default, unit and meaning, then exit")
    args = parser.parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    if args.show_config:
        print(describe_config(cfg))
        return 0
    from .trainer import train

    train(cfg)
    return 0


def _exit_finished(code: int):
    """End a finished process without tearing the interpreter down.

    The exit handlers run first (DataLoader workers are stopped, logs and streams flushed); what is
    skipped is the interpreter's finalisation: a last garbage collection over every object and the
    static destructors of torch's libraries, which on the CUDA build of torch took 2.1 to 3.0 s and touched
    66 to 117 MiB that training never held (six runs), so that a run's peak memory would be its exit
    (measured in benchmarks/README.md, "End to end against timm"). Every file of the run is closed before this.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_script() -> None:
    """The `goyal-train` console script: `train_main`, then the process ends as `_exit_finished` says."""
    _exit_finished(train_main())


@_guarded("goyal-data")
def data_main(argv: list[str] | None = None) -> int:
    from .data.generate import generate_main
    from .data.imagenet_archive import prepare_main
    from .data.validate import validate_main

    commands = {"generate": generate_main, "validate": validate_main, "prepare-imagenet": prepare_main}
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in commands:
        return _fail("goyal-data", "usage: goyal-data {generate,validate,prepare-imagenet} ROOT [options]; "
                                   "see goyal-data generate --help and goyal-data validate --help")
    return commands[argv[0]](argv[1:])


@_guarded("goyal-plot")
def plot_main(argv: list[str] | None = None) -> int:
    from .report import plot_main as main

    return main(argv)


@_guarded("goyal-replicate")
def replicate_main(argv: list[str] | None = None) -> int:
    from .replicate import main

    return main(argv)


@_guarded("goyal-plan")
def plan_main(argv: list[str] | None = None) -> int:
    from .plan_cli import main

    return main(argv)


COMMANDS = {"train": train_main, "data": data_main, "plot": plot_main}


def _arguments(argv: list[str]) -> list[str]:
    # The deepspeed launcher inserts --local_rank=N before our arguments; LOCAL_RANK carries it too.
    return [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]


def main(argv: list[str] | None = None) -> int:
    argv = _arguments(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        return _fail("goyal_recipe.cli", f"usage: python -m goyal_recipe.cli {{{','.join(COMMANDS)}}} ...")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    code = main()
    if _arguments(sys.argv[1:])[:1] == ["train"]:
        _exit_finished(code)
    sys.exit(code)
