"""The speed switches change speed only: model.channels_last and model.compile train the same run (the eager run
and channels_last in this process, engine=local; compile as its own process under accelerate)."""

import pytest

from _loop import run_local
from _runs import overrides, step_losses, train

UPDATES = 3
# fp32 on the CPU: channels_last picks other conv kernels, inductor fuses and reorders reductions. The
# tiny run's LR warms up to 0.2 on 64 images, so differences grow with each update; measured over 3
# updates: channels_last <= 4e-7, compile <= 1.4e-5 relative.
REL = 1e-4


@pytest.fixture(scope="module")
def eager(data_root, tmp_path_factory):
    return step_losses(run_local(data_root, tmp_path_factory.mktemp("eager"), "eager", **{"run.max_updates": UPDATES}))


def test_channels_last_changes_speed_only(eager, data_root, tmp_path):
    losses = step_losses(run_local(data_root, tmp_path, "cl", **{"run.max_updates": UPDATES,
                                                                 "model.channels_last": "true"}))
    assert sorted(losses) == list(range(1, UPDATES + 1))
    assert losses == pytest.approx(eager, rel=REL)


@pytest.mark.slow  # inductor compiles the forward and backward graphs with gcc: 1.5-4 min on 2 CPU cores
def test_compile_changes_speed_only(eager, data_root, tmp_path):
    cache = tmp_path / "inductor"
    # A cache of its own proves inductor built kernels here (compile_model would fall back to eager
    # on a failure at wrap time); one compile thread: on a 2-core machine a worker pool costs more than it saves.
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = train(overrides(data_root, tmp_path, "compiled", **{"run.max_updates": UPDATES, "model.compile": "true"}),
                 extra_env=env)
    assert "torch.compile unavailable" not in proc.stderr
    assert any(cache.rglob("*.so")), "inductor compiled no C++ kernel"
    losses = step_losses(tmp_path / "compiled")
    assert sorted(losses) == list(range(1, UPDATES + 1))
    assert losses == pytest.approx(eager, rel=REL)
