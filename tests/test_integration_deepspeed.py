"""The recipe in a user's own DeepSpeed loop (goyal_recipe.integrations.deepspeed).

One launch of this file under the `deepspeed` launcher (2 CPU processes, kn = 32 = 8 x 2 x 2
accumulation steps) runs `examples/deepspeed_loop.py` on ZeRO-0 and ZeRO-1, then the mistakes a
DeepSpeed user makes with the recipe, then goyal-train's own loop on DeepSpeed ZeRO-1; the tests read
what each rank recorded: the LR, the samples, the weights and the noise scale of each update against one
process over the same micro-batches.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("deepspeed")

from _reference import (ZERO1, assert_same_noise, check_noise_scale, example_data, goyal_train,  # noqa: E402
                        noise_records, one_process_run, reference_run, reference_updates)
from _runs import records  # noqa: E402
from goyal_recipe import EpochShuffleSampler, GoyalLR, build_optimizer, global_batch_loss  # noqa: E402
from goyal_recipe.errors import RecipeMismatch, UserError  # noqa: E402
from goyal_recipe.integrations import deepspeed as goyal_ds  # noqa: E402

import deepspeed_loop as example  # noqa: E402 - examples/, on the path through _reference

REPO = Path(__file__).resolve().parents[1]
KN, N, WORLD, STEPS = 32, 8, 2, 2
EPOCHS, UPDATES_PER_EPOCH, SAMPLES = 2, 3, 96  # 96 samples / kn 32 = 3 updates per epoch


# ---------------------------------------------------------------------------------------------------
# The worker: runs under `deepspeed --num_gpus 2`, one scenario after another in the same processes.


def _user_loop(engine, loader, sampler, backward) -> None:
    """A DeepSpeed user's loop for one update: forward, `backward`, engine.step() per micro-batch."""
    sampler.set_epoch(0)
    for images, labels, _ in loader:
        backward(engine, F.cross_entropy(engine(images), labels, reduction="none"))
        last = engine.is_gradient_accumulation_boundary()
        engine.step()
        if last:
            return


def _mistake(name: str, out: Path, run) -> None:
    """Run one mistaken loop; record the one-line refusal and how many updates ran before it."""
    state = {"updates_done": None}
    try:
        run(state)
        result = {"error": None}
    except RecipeMismatch as e:
        result = {"error": str(e)}
    result["updates_done"] = state["updates_done"]
    if torch.distributed.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(result))


def worker(out: Path, data_root: Path) -> None:
    import deepspeed

    example.main(["--record", str(out / "zero0"), "--weights-at", "1", "3"])
    example.main(["--record", str(out / "zero1"), "--max-updates", "3", "--zero-stage", "1", "--weights-at", "1"])

    pixels, labels = example_data.generated_images()
    dataset = torch.utils.data.TensorDataset(pixels, labels, torch.arange(SAMPLES))
    rank = torch.distributed.get_rank()
    sampler = EpochShuffleSampler(len(dataset), WORLD, rank, batch_size=N, accumulation_steps=STEPS)
    loader = torch.utils.data.DataLoader(dataset, batch_size=N, sampler=sampler)
    schedule = example_data.image_schedule(KN, EPOCHS)
    chain = {"train_batch_size": KN, "train_micro_batch_size_per_gpu": N}

    def build(model):
        return build_optimizer(model, "sgd", nesterov=True, weight_decay=1e-4)

    def own_initialize_then_attach(state, model, optimizer, config):
        # The user's own deepspeed.initialize, then attach, then the loop's first update.
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        scheduler = goyal_ds.attach(engine, schedule, UPDATES_PER_EPOCH, sampler=sampler, bn_group_size=4)
        state["updates_done"] = 0
        _user_loop(engine, loader, sampler, goyal_ds.backward)
        state["updates_done"] = scheduler.updates_done

    def own_config_default_clipping(state):
        # The user's own ds_config with the batch sizes and ZeRO stage only: DeepSpeed clips at 1.0 by default.
        model = example.make_model()
        own_initialize_then_attach(state, model, build(model), {**chain, "zero_optimization": {"stage": 0}})

    def backward_divides_again(state):
        # global_batch_loss (as in an accelerate loop) through engine.backward's default scale_wrt_gas=True.
        model = example.make_model()
        engine, _, scheduler = goyal_ds.initialize(model, build(model), schedule=schedule,
                                                   updates_per_epoch=UPDATES_PER_EPOCH, per_device_batch_size=N,
                                                   sampler=sampler, bn_group_size=4)
        state["updates_done"] = 0
        _user_loop(engine, loader, sampler,
                   lambda engine, per_sample: engine.backward(global_batch_loss(per_sample, KN, WORLD)))
        state["updates_done"] = scheduler.updates_done

    def zero1_without_untested_flag(state):
        model = example.make_model()
        config = {**chain, "gradient_clipping": 0, "zero_optimization": {"stage": 1}}
        goyal_ds.initialize(model, build(model), schedule=schedule, updates_per_epoch=UPDATES_PER_EPOCH,
                            config=config, sampler=sampler)
        state["updates_done"] = 0

    def own_config_through_initialize(state):
        model = example.make_model()
        goyal_ds.initialize(model, build(model), schedule=schedule, updates_per_epoch=UPDATES_PER_EPOCH,
                            config={**chain, "zero_optimization": {"stage": 0}}, sampler=sampler)
        state["updates_done"] = 0

    def deepspeed_alone_zero1(state):
        # What the user meets without the adapter: DeepSpeed's own assertion, no reason given.
        model = example.make_model()
        try:
            deepspeed.initialize(model=model, optimizer=build(model),
                                 config={**chain, "gradient_clipping": 0, "zero_optimization": {"stage": 1}})
        except AssertionError as e:
            raise RecipeMismatch(f"deepspeed: {e}") from None

    def zero1_decays_bn(state):
        # The SGD of every tutorial, decaying BN too, under ZeRO-1: its param groups are flat buffers by the time
        # attach runs, and ZeRO keeps the model's parameters of each group beside them.
        model = example.make_model()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        own_initialize_then_attach(state, model, sgd, goyal_ds.ds_config(KN, N, WORLD, zero_stage=1))

    def deepspeed_loader_not_reshuffled(state):
        # DeepSpeed's own loader (training_data=): a DistributedSampler that reshuffles only when the loop calls
        # its set_epoch. Refused at the next epoch's first update, after the first epoch's 3.
        model = example.make_model()
        engine, _, ds_loader, _ = deepspeed.initialize(model=model, optimizer=build(model), training_data=dataset,
                                                       config=goyal_ds.ds_config(KN, N, WORLD))
        scheduler = goyal_ds.attach(engine, schedule, UPDATES_PER_EPOCH, bn_group_size=4)
        for epoch in range(EPOCHS):
            for images, labels, _ in ds_loader:
                goyal_ds.backward(engine, F.cross_entropy(engine(images), labels, reduction="none"))
                engine.step()
                state["updates_done"] = scheduler.updates_done

    for name, run in [("zero1_decays_bn", zero1_decays_bn),
                      ("deepspeed_loader_not_reshuffled", deepspeed_loader_not_reshuffled),
                      ("default_clipping", own_config_default_clipping),
                      ("backward_divides_again", backward_divides_again),
                      ("zero1_untested", zero1_without_untested_flag),
                      ("default_clipping_initialize", own_config_through_initialize),
                      ("deepspeed_alone_zero1", deepspeed_alone_zero1)]:
        _mistake(name, out, run)

    goyal_train(data_root, out, "goyal_train_zero1", **ZERO1)


# ---------------------------------------------------------------------------------------------------
# The tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("ds_integration")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(Path(__file__).resolve()), "--out", str(out), "--data", str(data_root)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _ranks(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@functools.cache
def _reference() -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """1 process, the same micro-batches in turn, the recipe's optimizer and GoyalLR: the paper's update.
    The parameters and the noise scale after each of the example's updates."""
    updates = EPOCHS * UPDATES_PER_EPOCH
    pixels, labels = example_data.generated_images()
    model = example.make_model()
    model.train()
    optimizer = build_optimizer(model, "sgd", nesterov=True, weight_decay=1e-4)
    scheduler = GoyalLR(optimizer, example_data.image_schedule(KN, EPOCHS), UPDATES_PER_EPOCH)

    def loss_of(block):
        return global_batch_loss(F.cross_entropy(model(pixels[block]), labels[block], reduction="none"), KN)

    return reference_run(model, optimizer, scheduler, reference_updates(SAMPLES, KN, N, updates), loss_of, KN)


@pytest.mark.parametrize("run,updates", [("zero0", EPOCHS * UPDATES_PER_EPOCH), ("zero1", 3)])
def test_example_lr_and_data_on_every_rank(ds_runs, run, updates):
    schedule = example_data.image_schedule(KN, EPOCHS)
    expected_lr = [schedule.lr(t / UPDATES_PER_EPOCH) for t in range(updates)]
    ranks = _ranks(ds_runs / run)
    for record in ranks:
        assert record["world_size"] == WORLD
        assert record["lr"] == pytest.approx(expected_lr, rel=1e-12)
    reference = reference_updates(SAMPLES, KN, N, updates)
    for t, micro_batches in enumerate(reference):
        # The update's samples are exactly the reference's, split between the ranks.
        used = ranks[0]["indices"][t] + ranks[1]["indices"][t]
        assert sorted(used) == sorted(i for block in micro_batches for i in block), t
    for epoch in range(updates // UPDATES_PER_EPOCH):
        seen = [i for r in ranks for t in range(epoch * UPDATES_PER_EPOCH, (epoch + 1) * UPDATES_PER_EPOCH)
                for i in r["indices"][t]]
        assert sorted(seen) == list(range(SAMPLES))  # each sample once per epoch


# After the first update the weights agree to float32 rounding (~1e-7 here); the two updates after it
# amplify those differences ~300x in this small network with BN groups of 4, so 3 updates get a
# wider bound, still ~1000x below what a wrong loss scale or clipping moves the weights.
@pytest.mark.parametrize("run,weights,updates,rtol,atol", [
    ("zero0", "model_update1", 1, 1e-5, 1e-6), ("zero1", "model_update1", 1, 1e-5, 1e-6),
    ("zero0", "model_update3", 3, 1e-3, 2e-4), ("zero1", "model", 3, 1e-3, 2e-4)])
def test_example_parameters_equal_one_process_reference(ds_runs, run, weights, updates, rtol, atol):
    from safetensors.torch import load_file

    trained = load_file(ds_runs / run / f"{weights}.safetensors")
    reference = _reference()[0][updates - 1]
    initial = dict(example.make_model().named_parameters())
    assert sum(not torch.equal(value, initial[name]) for name, value in reference.items()) > len(reference) // 2
    assert set(reference) <= set(trained)
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=rtol, atol=atol)


@pytest.mark.parametrize("run,updates", [("zero0", EPOCHS * UPDATES_PER_EPOCH), ("zero1", 3)])
def test_example_noise_scale_equals_one_process_reference(ds_runs, run, updates):
    """2 ranks x 2 micro-batches of 8 give the noise scale of 1 process over the same 4 micro-batches: ZeRO-0
    from .grad, ZeRO-1 from the norm DeepSpeed computes over its partitions. float32: the first update to
    rounding, later ones within what the weights' own float32 drift moves them."""
    expected = _reference()[1][:updates]
    for record in _ranks(ds_runs / run):
        check_noise_scale(record["noise"][:1], expected[:1], rel=1e-4)
        check_noise_scale(record["noise"], expected, rel=1e-2)


def test_goyal_train_zero1_noise_scale_two_processes_equals_one(ds_runs, data_root, tmp_path_factory):
    """goyal-train on DeepSpeed ZeRO-1 (the reduced gradient's norm from DeepSpeed's partitions), 2 processes x
    1 micro-batch of 8, measuring updates 1 and 3: update 1 (the initial weights, any optimizer) has the noise
    scale of 1 process x 2 micro-batches over the same images; update 2 logs update 1's averages, update 3 new ones."""
    run = ds_runs / "goyal_train_zero1"
    assert records(run, "run")[0]["world_size"] == 2
    assert_same_noise(run, one_process_run(data_root, tmp_path_factory)[0], updates=1)
    zero1 = noise_records(run)
    assert {k: v for k, v in zero1[1].items() if k != "update"} == {k: v for k, v in zero1[0].items() if k != "update"}
    assert zero1[2]["noise_grad_sq"] != zero1[1]["noise_grad_sq"]


@pytest.mark.parametrize("name,message", [
    ("default_clipping", "grad_clipping: the DeepSpeed engine clips gradients at norm 1 (DeepSpeed's default when "
                         "ds_config has no gradient_clipping is 1) but the recipe does not clip (nor does the paper); "
                         "set \"gradient_clipping\": 0 in ds_config"),
    ("backward_divides_again", "loss_divided_twice: each sample's gradient carries 0.5 x 1/kn instead of 1/kn"),
    ("zero1_untested", "deepspeed_untested_optimizer: ZeRO-1 stops on SGD unless ds_config sets "
                       "\"zero_allow_untested_optimizer\": true; set it: ZeRO-1 only shards"),
    ("default_clipping_initialize", "grad_clipping: ds_config has no gradient_clipping, so DeepSpeed clips at its "
                                    "default 1 but the recipe does not clip"),
    ("deepspeed_alone_zero1", "deepspeed: You are using an untested ZeRO Optimizer"),
    ("zero1_decays_bn", "norm_weight_decay: weight decay 0.0001 on 30 normalisation parameters "
                        "(conv1.1.weight, conv1.1.bias, conv1.4.weight and 27 more)"),
])
def test_mistakes_stop_before_the_first_update(ds_runs, name, message):
    result = json.loads((ds_runs / f"{name}.json").read_text())
    assert result["error"] is not None and result["error"].startswith(message), result["error"]
    assert "\n" not in result["error"]
    assert result["updates_done"] in (None, 0)  # refused before any parameter moved


def test_deepspeeds_own_loader_never_reshuffled_stops_at_the_next_epoch(ds_runs):
    result = json.loads((ds_runs / "deepspeed_loader_not_reshuffled.json").read_text())
    assert result["error"].startswith(
        f"sampler_not_reshuffled: update {UPDATES_PER_EPOCH} starts epoch 1 but the sampler is still at epoch 0")
    assert result["updates_done"] == UPDATES_PER_EPOCH


# ---------------------------------------------------------------------------------------------------
# ds_config and the check of a user's own config (no processes needed)


def test_ds_config_from_the_recipe():
    config = goyal_ds.ds_config(8192, 256, world_size=8, zero_stage=1)
    assert {k: config[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                   "gradient_accumulation_steps", "gradient_clipping")} == {
        "train_batch_size": 8192, "train_micro_batch_size_per_gpu": 256, "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.0}
    assert config["zero_optimization"] == {"stage": 1} and config["zero_allow_untested_optimizer"] is True
    assert goyal_ds.ds_config(8192, 256, world_size=8, grad_clip_norm=2.0)["gradient_clipping"] == 2.0
    assert goyal_ds.ds_config(32, 8, 2, communication_data_type="fp32",
                              zero_optimization={"reduce_bucket_size": 5e7})["zero_optimization"] == {
        "reduce_bucket_size": 5e7, "stage": 0}
    assert goyal_ds.check_ds_config(config, global_batch_size=8192, world_size=8,
                                    optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) == []


@pytest.mark.parametrize("kwargs,error", [
    (dict(global_batch_size=100, per_device_batch_size=8, world_size=2), "not a positive multiple of"),
    (dict(global_batch_size=32, per_device_batch_size=8, world_size=2, zero_stage=3), "ZeRO-0 or ZeRO-1"),
    (dict(global_batch_size=32, per_device_batch_size=8, world_size=2, optimizer={"type": "SGD"}),
     "deepspeed_optimizer: ds_config sets 'optimizer'"),
    (dict(global_batch_size=32, per_device_batch_size=8, world_size=2, gradient_clipping=1.0),
     "ds_config got gradient_clipping=1.0 but the recipe gives 0.0"),
])
def test_ds_config_refuses(kwargs, error):
    with pytest.raises(UserError, match=error):
        goyal_ds.ds_config(**kwargs)


@pytest.mark.parametrize("config,codes", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0}, []),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8}, ["grad_clipping"]),
    ({"train_batch_size": 32, "gradient_clipping": 0.5}, ["grad_clipping"]),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4, "gradient_clipping": 0},
     ["deepspeed_batch_chain"]),  # 8 x 2 x 4 = 64, not kn = 32
    ({"train_batch_size": 32, "gradient_clipping": 0, "scheduler": {"type": "WarmupLR"}}, ["deepspeed_scheduler"]),
    ({"train_batch_size": 32, "gradient_clipping": 0, "zero_optimization": {"stage": 1}},
     ["deepspeed_untested_optimizer"]),
    ({"train_batch_size": 32, "gradient_clipping": 0, "zero_optimization": {"stage": 1},
      "zero_allow_untested_optimizer": True}, []),
])
def test_check_of_a_users_ds_config(config, codes):
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    findings = goyal_ds.check_ds_config(config, global_batch_size=32, world_size=2, optimizer=sgd)
    assert [f.code for f in findings] == codes
    assert all("\n" not in str(f) for f in findings)


def test_check_of_a_users_ds_config_refuses_a_non_number():
    with pytest.raises(UserError, match="ds_config has gradient_clipping='auto'; DeepSpeed needs a number"):
        goyal_ds.check_ds_config({"gradient_clipping": "auto"}, global_batch_size=32, world_size=2)


def test_trainer_engine_uses_the_same_ds_config():
    from goyal_recipe.config import load_config
    from goyal_recipe.engines.deepspeed import ds_config

    cfg = load_config("recipes/resnet50_kn8k.yaml", ["engine=deepspeed", "deepspeed.zero_stage=1"])
    assert ds_config(cfg, world_size=8) == goyal_ds.ds_config(8192, 256, world_size=8, zero_stage=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    worker(args.out, args.data)
