import glob
import os

import pytest

from _runs import TINY
from goyal_recipe.data.generate import generate_dataset


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A tiny generated dataset in both formats (JPEG folders and parquet shards)."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(root, **TINY)
    return root


@pytest.fixture(scope="session", autouse=True)
def remove_deepspeed_shared_memory():
    """DeepSpeed's CPU all-reduce leaves its shared-memory buffers (66 MB each, two per 2-process run) in
    /dev/shm after its processes end; they are RAM, and a test session's runs would keep about 1 GB of it."""
    pattern = "/dev/shm/deepspeed_allreduce_buffer_*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        try:
            os.remove(path)
        except OSError:
            pass
