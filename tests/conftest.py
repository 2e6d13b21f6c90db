import pytest

from _runs import TINY
from goyal_recipe.data.generate import generate_dataset


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A tiny generated dataset in both formats (JPEG folders and parquet shards)."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(root, **TINY)
    return root
