"""The real loop (goyal_recipe.trainer) inside the test process, on engine=local: one process, no launcher."""

import torch

from _runs import RECIPE, overrides
from goyal_recipe.cli import train_main
from goyal_recipe.config import load_config
from goyal_recipe.trainer import train


def local_args(data_root, out, name, **extra):
    """The tiny recipe of `_runs.overrides` on engine=local. keep_freed_cpu_memory is off: it would change the
    test process's allocator for every later test."""
    return overrides(data_root, out, name, engine="local", **{"run.keep_freed_cpu_memory": "false", **extra})


class _OneThread:
    """Compute with one thread, as the launched runs do (OMP_NUM_THREADS=1), so that an in-process run and a
    launched one reduce in the same order; the test process's setting is put back after."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def run_local(data_root, out, name, **extra):
    """Train the tiny recipe in this process; returns its run directory. A UserError propagates."""
    with _OneThread():
        train(load_config(RECIPE, local_args(data_root, out, name, **extra)))
    return out / name


def main_local(data_root, out, name, **extra) -> int:
    """`goyal-train` in this process (the console script's one-line errors and exit code); returns the code."""
    with _OneThread():
        return train_main([str(RECIPE), *local_args(data_root, out, name, **extra)])
