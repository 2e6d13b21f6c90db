import glob
import os

import pytest
import torch

from _runs import TINY
from goyal_recipe.data.generate import generate_dataset

DEEPSPEED_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"
_buffers_before = pytest.StashKey[set]()

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Each worker's in-process computation gets its share of the cores: more threads than cores make torch's
    # OpenMP threads wait on each other.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A tiny generated dataset in both formats (JPEG folders and parquet shards)."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(root, **TINY)
    return root


def pytest_sessionstart(session):
    session.config.stash[_buffers_before] = set(glob.glob(DEEPSPEED_BUFFERS))


def pytest_sessionfinish(session):
    """DeepSpeed's CPU all-reduce leaves its shared-memory buffers (66 MB each, two per 2-process run) in
    /dev/shm after its processes end; they are RAM, and a test session's runs would keep about 1 GB of it. Only
    the controller removes them, after every worker has ended, so that no buffer a running job opens goes away."""
    if hasattr(session.config, "workerinput"):
        return
    for path in set(glob.glob(DEEPSPEED_BUFFERS)) - session.config.stash[_buffers_before]:
        try:
            os.remove(path)
        except OSError:
            pass
