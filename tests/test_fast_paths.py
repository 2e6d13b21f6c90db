"""The speed switches change speed only: model.channels_last and model.compile train the same run (the eager run
and channels_last in this process, engine=local; compile as its own process under accelerate). On CUDA, an
update waits for the device once."""

import itertools
import warnings

import pytest
import torch

from _loop import run_local
from _runs import overrides, step_losses, train
from goyal_recipe.config import RecipeConfig, plan_batches
from goyal_recipe.engines import make_engine
from goyal_recipe.step import TrainStep, build_training

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_one_host_synchronisation_per_update_on_cuda(accumulation_steps, tmp_path):
    # The update's only wait for the device is finish_update reading the all-reduced verdict; the noise scale
    # (measured every update here, with two micro-batches), ghost BN, bf16 and channels_last add none.
    cfg = RecipeConfig.model_validate({
        "run": {"name": "syncs", "output_dir": str(tmp_path), "plots": False, "noise_scale_every_updates": 1},
        "model": {"name": "resnet10t", "bn": "ghost", "bn_group_size": 8, "precision": "bf16", "channels_last": True},
        "batch": {"global_batch_size": 32, "per_device_batch_size": 32 // accumulation_steps},
    })
    engine = make_engine(cfg)
    plan = plan_batches(cfg, engine.world_size)
    model, optimizer, scheduler = build_training(cfg, engine, plan, 10, 100)
    model.train()
    step = TrainStep(cfg, engine, plan, model, optimizer, scheduler)
    assert (step.noise is not None) == (accumulation_steps == 2)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(plan.per_device_batch_size, 3, 32, 32, generator=g),
             torch.randint(0, 10, (plan.per_device_batch_size,), generator=g),
             torch.arange(plan.per_device_batch_size), torch.zeros(plan.per_device_batch_size, dtype=torch.long))
    step(itertools.repeat(batch))  # the first update initialises cuDNN and the optimizer state
    torch.cuda.synchronize()
    updates = 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            applied = [step(itertools.repeat(batch)).applied for _ in range(updates)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)]
    assert applied == [True] * updates
    assert len(syncs) == updates, syncs  # where each happened (the Python line), if more
