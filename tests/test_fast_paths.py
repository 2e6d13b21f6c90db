"""The speed switches change speed only: model.channels_last and model.compile train the same run (the eager run
and channels_last in this process, engine=local; compile as its own process under accelerate). An update waits
for the device once: measured on CUDA where a GPU is, counted on a CPU everywhere."""

import inspect
import itertools
import warnings

import pytest
import torch

from _host_waits import HostWaits
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


def _update_step(tmp_path, accumulation_steps: int, engine_name: str = "accelerate", image_size: int = 32,
                 precision: str = "bf16"):
    """The trainer's update (ghost BN, channels_last, the noise scale measured every update where there are two
    micro-batches) and a batch for it, after a first update that makes the optimizer state."""
    cfg = RecipeConfig.model_validate({
        "run": {"name": "waits", "output_dir": str(tmp_path), "plots": False, "noise_scale_every_updates": 1},
        "engine": engine_name,
        "model": {"name": "resnet10t", "bn": "ghost", "bn_group_size": 8, "precision": precision, "channels_last": True},
        "batch": {"global_batch_size": 32, "per_device_batch_size": 32 // accumulation_steps},
    })
    engine = make_engine(cfg)
    plan = plan_batches(cfg, engine.world_size)
    model, optimizer, scheduler = build_training(cfg, engine, plan, 10, 100)
    model.train()
    step = TrainStep(cfg, engine, plan, model, optimizer, scheduler)
    assert (step.noise is not None) == (accumulation_steps == 2)
    g = torch.Generator().manual_seed(0)
    n = plan.per_device_batch_size
    batch = (torch.randn(n, 3, image_size, image_size, generator=g), torch.randint(0, 10, (n,), generator=g),
             torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert step(itertools.repeat(batch)).applied
    return step, batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_one_host_synchronisation_per_update_on_cuda(accumulation_steps, tmp_path):
    # The update's only wait for the device is finish_update reading the all-reduced verdict; the noise scale,
    # ghost BN, bf16 and channels_last add none.
    step, batch = _update_step(tmp_path, accumulation_steps)
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


def _verdict_line() -> str:
    """Where the update's one wait belongs: verdict_and_sums reading the all-reduced verdict."""
    from goyal_recipe.engines import base

    lines, first = inspect.getsourcelines(base.verdict_and_sums)
    return f"goyal_recipe/engines/base.py:{first + next(i for i, s in enumerate(lines) if 'bool(reduced' in s)}"


@pytest.mark.parametrize("engine_name,accumulation_steps", [("accelerate", 1), ("accelerate", 2), ("local", 2)])
def test_one_host_wait_per_update_counted_on_cpu(engine_name, accumulation_steps, tmp_path):
    # The CI's stand-in for the CUDA test above (run where a GPU is): every device value read on the host and
    # every blocking host-to-device copy of an update, counted on a CPU (tests/_host_waits.py). On the code the
    # H200 measured with 3 syncs per update (git 7a4ea98), it counted the same 3: two indexed assignments in
    # UpdateSums.set_counts and the verdict.
    # fp32: bf16 autocast on a CPU left NaN in this tiny model's gradients now and then (1x1 maps in its last
    # stage; with plain BN and either SGD path too). The trainer drops those updates, as it must; this test
    # counts the waits of applied ones.
    step, batch = _update_step(tmp_path, accumulation_steps, engine_name, image_size=16, precision="fp32")
    updates = 3
    with HostWaits(host_tensors=batch) as counted:
        applied = [step(itertools.repeat(batch)).applied for _ in range(updates)]
    assert applied == [True] * updates
    assert [what for what, _ in counted.waits] == ["device value read on the host (_local_scalar_dense)"] * updates
    assert all(line.endswith(_verdict_line()) for _, line in counted.waits), counted.waits


def test_host_waits_sees_each_kind_of_wait_and_no_host_work():
    device_tensor = torch.ones(4)  # not declared host: stands for a tensor on the device
    index, bad = torch.arange(4), torch.zeros(4, dtype=torch.long)
    with HostWaits(host_tensors=(index, bad)) as counted:
        int(bad.sum()), index.tolist(), bad.float().mean().item()  # host work: no wait
        torch.zeros(2).add_(1).tolist()  # made on the host without a device
        on_device = torch.zeros(2, device="cpu")  # made on the device by a kernel: no wait
        on_device += 1
        index.to("cpu", non_blocking=True)
    assert counted.waits == []
    with HostWaits(host_tensors=(index, bad)) as counted:
        device_tensor.sum().item()
        bool(device_tensor.max() > 0)
        device_tensor.tolist()
        device_tensor.cpu()
        device_tensor[device_tensor > 0]  # a boolean mask: nonzero
        torch.tensor([1.0, 2.0], device="cpu")
        device_tensor[0] = 3.0
        device_tensor.copy_(index.float())
        index.to("cpu")
        device_tensor + index
    kinds = [what.split(" (")[0] for what, _ in counted.waits]
    assert kinds == ["device value read on the host"] * 5 + ["blocking host-to-device copy"] * 4 + [
        "host tensor with elements in a device op"]
    assert all("tests/test_fast_paths.py:" in line for _, line in counted.waits)  # the line that asked
