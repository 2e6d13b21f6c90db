"""Console entry points: goyal-train, goyal-data, goyal-plot (and `python -m goyal_recipe.cli <command>`)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def _fail(program: str, message: str, every_rank: bool = False) -> int:
    """One line on stderr and exit code 2; once per launch, or from each rank where ranks see different data."""
    rank = os.environ.get("RANK", "0")
    if every_rank or rank == "0":
        where = f" (rank {rank})" if every_rank and "RANK" in os.environ else ""
        print(f"{program}: error{where}: {message}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="goyal-train",
        description="Train a timm model with the large-minibatch recipe of Goyal et al. 2017.",
        epilog="example: goyal-train recipes/resnet50_kn8k.yaml data.root=/data/imagenet optim.warmup=constant",
    )
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, key.sub=value")
    args = parser.parse_args(argv)
    from .data.sources import BadImageError

    try:
        cfg = load_config(args.recipe, args.overrides)
        from .trainer import train

        train(cfg)
    except (ConfigError, FileNotFoundError, FloatingPointError) as e:
        return _fail("goyal-train", str(e))
    except BadImageError as e:  # found by the rank that loaded it
        return _fail("goyal-train", str(e), every_rank=True)
    return 0


def data_main(argv: list[str] | None = None) -> int:
    from .data.generate import generate_main
    from .data.validate import validate_main

    commands = {"generate": generate_main, "validate": validate_main}
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in commands:
        return _fail("goyal-data", "usage: goyal-data {generate,validate} ROOT [options]; "
                                   "see goyal-data generate --help and goyal-data validate --help")
    return commands[argv[0]](argv[1:])


def plot_main(argv: list[str] | None = None) -> int:
    from .report import plot_main as main

    return main(argv)


COMMANDS = {"train": train_main, "data": data_main, "plot": plot_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher inserts --local_rank=N before our arguments; LOCAL_RANK carries it too.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0] not in COMMANDS:
        return _fail("goyal_recipe.cli", f"usage: python -m goyal_recipe.cli {{{','.join(COMMANDS)}}} ...")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
