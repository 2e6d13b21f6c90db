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


# The longest files first (by their time in a run on 2 cores): xdist hands out files in this order
# (--no-loadscope-reorder), and a long file handed out last would leave one worker running it alone at the end.
LONG_FILES_FIRST = ("test_trainer.py", "test_faults_train.py", "test_deepspeed.py", "test_integration_transformers.py",
                    "test_benchmarks.py", "test_integration_accelerate.py", "test_loop.py",
                    "test_integration_deepspeed.py", "test_integration_accelerate_deepspeed.py", "test_bn.py",
                    "test_config_errors.py", "test_launch_configs.py", "test_integration_ddp.py")


def pytest_collection_modifyitems(items):
    order = {name: position for position, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: each file's own order is kept


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
