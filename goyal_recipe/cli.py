"""Console entry points: goyal-train, goyal-data, goyal-plot (and `python -m goyal_recipe.cli <command>`)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def _fail(program: str, message: str) -> int:
    # One line per launch, not one per rank.
    if os.environ.get("RANK", "0") == "0":
        print(f"{program}: error: {message}", file=sys.stderr)
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
    try:
        cfg = load_config(args.recipe, args.overrides)
        from .trainer import train

        train(cfg)
    except (ConfigError, FileNotFoundError) as e:
        return _fail("goyal-train", str(e))
    return 0


def data_main(argv: list[str] | None = None) -> int:
    from .data.generate import generate_main

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "generate":
        return _fail("goyal-data", "usage: goyal-data generate ROOT [options]; see goyal-data generate --help")
    return generate_main(argv[1:])


def plot_main(argv: list[str] | None = None) -> int:
    from .report import plot_main as main

    return main(argv)


COMMANDS = {"train": train_main, "data": data_main, "plot": plot_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        return _fail("goyal_recipe.cli", f"usage: python -m goyal_recipe.cli {{{','.join(COMMANDS)}}} ...")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
