"""The recipe in a transformers Trainer (goyal_recipe.integrations.transformers.GoyalTrainer).

One launch of this file under `accelerate launch --multi_gpu --num_processes 2` with
ACCELERATE_USE_CPU=1 (2 CPU processes, kn = 32 = 8 x 2 x 2 accumulation steps) runs
`examples/trainer_loop.py`, a checkpoint and resume through Trainer's own mechanism, and the
mistakes a Trainer user makes with the recipe; the tests read what each rank recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from _reference import check_noise_scale, example_data, reference_run, reference_updates  # noqa: E402
from goyal_recipe import (EpochShuffleSampler, GoyalLR, build_optimizer, global_batch_loss,  # noqa: E402
                          use_ghost_batchnorm, zero_init_last_bn)
from goyal_recipe.errors import RecipeMismatch, UserError  # noqa: E402

import trainer_loop as example  # noqa: E402 - examples/, on the path through _reference

KN, N, WORLD, STEPS = 32, 8, 2, 2
EPOCHS, UPDATES_PER_EPOCH, SAMPLES = 2, 3, 96
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# The worker: runs under the launcher, one scenario after another in the same processes.


def worker(out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from goyal_recipe.integrations.transformers import GoyalTrainer

    # The example, its weights after update 1, a checkpoint every 2 updates; resumed from the one after update 2.
    example.main(["--output-dir", str(out / "example_run"), "--record", str(out / "example"), "--save-steps", "2",
                  "--weights-at", "1"])
    checkpoint_2 = str(out / "example_run" / "checkpoint-2")
    example.main(["--output-dir", str(out / "resumed_run"), "--resume", checkpoint_2, "--record", str(out / "resumed")])
    # Resumed inside the second epoch (update 4 of 6): Trainer's skip puts the sampler three wrappers down.
    example.main(["--output-dir", str(out / "resumed_run_4"), "--resume", str(out / "example_run" / "checkpoint-4"),
                  "--record", str(out / "resumed_4")])
    rank = int(os.environ["RANK"])

    def save_weights(trainer, path):
        if trainer.is_world_process_zero():
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}, str(path))

    # The same loop in float64, where the weights after 3 updates must agree with the reference to rounding.
    trainer = example.build_trainer(out / "float64_run", model=example.make_model().double(),
                                    dataset=example.GeneratedImages(dtype=torch.float64), max_steps=3)
    trainer.train()
    save_weights(trainer, out / "float64_3.safetensors")
    (out / f"float64_noise_rank{rank}.json").write_text(json.dumps(example.logged_noise(trainer)))

    def mistake(name, run, resume=None):
        try:
            trainer = run(out / name)
            trainer.train(resume_from_checkpoint=resume)
            result = {"error": None, "updates": trainer.state.global_step}
            save_weights(trainer, out / f"{name}.safetensors")
        except RecipeMismatch as e:
            result = {"error": str(e), "updates": trainer.state.global_step}
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps(result))

    # Trainer's default max_grad_norm (1.0) left in place.
    default_clip = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "max_grad_norm")
    mistake("default_max_grad_norm", lambda d: example.build_trainer(d, max_grad_norm=default_clip))

    class RankSampler(GoyalTrainer):  # the sampler of an accelerate loop: split by rank, then by Trainer again
        def _get_train_sampler(self, train_dataset=None):
            return EpochShuffleSampler(len(self.train_dataset), self.args.world_size, self.args.process_index,
                                       batch_size=N, accumulation_steps=STEPS)

    mistake("sampler_split_twice", lambda d: example.build_trainer(d, trainer_class=RankSampler))

    class TrainerOptimizer(GoyalTrainer):  # Trainer's own optimizer and weight-decay filter
        create_optimizer = Trainer.create_optimizer

    mistake("trainer_weight_decay", lambda d: example.build_trainer(
        d, trainer_class=TrainerOptimizer, optim="sgd", learning_rate=0.1, weight_decay=1e-4))

    class ModelLoss(GoyalTrainer):  # Trainer's compute_loss: the model's own mean loss
        compute_loss = Trainer.compute_loss

    mistake("model_computes_loss", lambda d: example.build_trainer(d, trainer_class=ModelLoss))

    class GlobalBatchLossModel(type(example.make_model())):  # the README's loss helper inside the model
        def forward(self, pixel_values, labels=None, **kwargs):
            out = super().forward(pixel_values, **kwargs)
            if labels is not None:
                out.loss = global_batch_loss(F.cross_entropy(out.logits, labels, reduction="none"), KN, WORLD)
            return out

    def loss_in_model(d):
        config = example.make_model().config
        torch.manual_seed(0)  # the initial weights of make_model()
        return example.build_trainer(d, model=GlobalBatchLossModel(config).double(), max_steps=3,
                                     dataset=example.GeneratedImages(dtype=torch.float64))

    mistake("global_batch_loss_in_model", loss_in_model)

    # Trainer's resume without its batch skipping: the LR resumes at update 2, the data at the epoch's first sample.
    mistake("resume_ignoring_data_skip", lambda d: example.build_trainer(d, ignore_data_skip=True),
            resume=checkpoint_2)


# ---------------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_integration")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _ranks(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _expected_lr(updates: int) -> list[float]:
    schedule = example_data.image_schedule(KN, EPOCHS)
    return [schedule.lr(t / UPDATES_PER_EPOCH) for t in range(updates)]


@functools.cache
def _reference(updates: int, dtype: torch.dtype = torch.float32) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """1 process, the same micro-batches in turn, the recipe's optimizer and GoyalLR: the paper's update.
    The parameters and the noise scale after each update."""
    pixels, labels = example_data.generated_images(dtype=dtype)
    model = example.make_model().to(dtype)
    zero_init_last_bn(model)
    use_ghost_batchnorm(model, 4)
    model.train()
    optimizer = build_optimizer(model, "sgd", nesterov=True, weight_decay=1e-4)
    scheduler = GoyalLR(optimizer, example_data.image_schedule(KN, EPOCHS), UPDATES_PER_EPOCH)

    def loss_of(block):
        logits = model(pixel_values=pixels[block]).logits
        return global_batch_loss(F.cross_entropy(logits, labels[block], reduction="none"), KN)

    return reference_run(model, optimizer, scheduler, reference_updates(SAMPLES, KN, N, updates), loss_of, KN)


def _reference_parameters(updates: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return _reference(3, dtype)[0][updates - 1]


def _assert_parameters_equal(trained: dict, reference: dict, rtol: float, atol: float) -> None:
    initial = dict(example.make_model().named_parameters())
    assert sum(not torch.equal(value.float(), initial[name]) for name, value in reference.items()) > len(reference) // 2
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=rtol, atol=atol)


def test_example_lr_and_data_on_every_rank(trainer_runs):
    ranks = _ranks(trainer_runs / "example")
    reference = reference_updates(SAMPLES, KN, N, EPOCHS * UPDATES_PER_EPOCH)
    for rank, record in enumerate(ranks):
        assert record["world_size"] == WORLD
        assert record["lr"] == pytest.approx(_expected_lr(EPOCHS * UPDATES_PER_EPOCH), rel=1e-12)
        # Rank r's micro-batches are blocks r, r + 2 of each update: the split of EpochShuffleSampler(num_replicas=2).
        assert record["read"] == [i for update in reference for block in update[rank::WORLD] for i in block]
    per_epoch = SAMPLES // WORLD
    for epoch in range(EPOCHS):
        seen = [i for r in ranks for i in r["read"][epoch * per_epoch:(epoch + 1) * per_epoch]]
        assert sorted(seen) == list(range(SAMPLES))  # each sample once per epoch


def test_example_parameters_equal_one_process_reference(trainer_runs):
    """float32 after the first update (later updates amplify its rounding ~300x per 2 updates in this small
    network with BN groups of 4), and float64 after 3 updates."""
    from safetensors.torch import load_file

    _assert_parameters_equal(load_file(trainer_runs / "example" / "model_update1.safetensors"),
                             _reference_parameters(1), rtol=1e-5, atol=1e-6)
    _assert_parameters_equal(load_file(trainer_runs / "float64_3.safetensors"),
                             _reference_parameters(3, torch.float64), rtol=1e-10, atol=1e-12)


def test_resume_through_trainer_checkpoints_keeps_lr_and_data(trainer_runs):
    from safetensors.torch import load_file

    checkpoint = trainer_runs / "example_run" / "checkpoint-2"
    scheduler_state = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    assert scheduler_state["updates_done"] == 2
    assert scheduler_state["noise_scale"]["updates_seen"] == 2 and scheduler_state["noise_scale"]["tracker"]["updates"] == 2
    uninterrupted, resumed = _ranks(trainer_runs / "example"), _ranks(trainer_runs / "resumed")
    for before, after in zip(uninterrupted, resumed):
        assert after["lr"] == pytest.approx(_expected_lr(EPOCHS * UPDATES_PER_EPOCH), rel=1e-12)
        assert after["read"] == before["read"][2 * STEPS * N:]  # continues at update 2's first sample
        # Trainer's resumed log history holds updates 1-2 from the checkpoint; the noise-scale averages logged after
        # them continue the checkpoint's (restarted, update 3 would log its own estimate alone).
        check_noise_scale(after["noise"][2:], before["noise"][2:], rel=1e-4)
    reference = load_file(trainer_runs / "example" / "model.safetensors")
    other = load_file(trainer_runs / "resumed" / "model.safetensors")
    for name, value in reference.items():
        torch.testing.assert_close(other[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_inside_a_later_epoch_reads_that_epochs_order(trainer_runs):
    from safetensors.torch import load_file

    uninterrupted, resumed = _ranks(trainer_runs / "example"), _ranks(trainer_runs / "resumed_4")
    for before, after in zip(uninterrupted, resumed):
        assert after["lr"] == pytest.approx(_expected_lr(EPOCHS * UPDATES_PER_EPOCH), rel=1e-12)
        assert after["read"] == before["read"][4 * STEPS * N:]  # epoch 1's order from update 4's first sample
    reference = load_file(trainer_runs / "example" / "model.safetensors")
    other = load_file(trainer_runs / "resumed_4" / "model.safetensors")
    for name, value in reference.items():
        torch.testing.assert_close(other[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_example_noise_scale_equals_one_process_reference(trainer_runs):
    """Trainer's logs carry the noise scale of 2 ranks x 2 micro-batches of 8, which is one process's over the
    same 4 micro-batches: in float32 after the first update (later ones amplify the weights' rounding, as for
    the parameters), in float64 to 1e-9 after each of 3."""
    expected = _reference(3)[1]
    for record in _ranks(trainer_runs / "example"):
        assert len(record["noise"]) == EPOCHS * UPDATES_PER_EPOCH
        check_noise_scale(record["noise"][:1], expected[:1], rel=1e-4)
    expected = _reference(3, torch.float64)[1]
    for rank in range(WORLD):
        check_noise_scale(json.loads((trainer_runs / f"float64_noise_rank{rank}.json").read_text()), expected, rel=1e-9)


@pytest.mark.parametrize("name,message", [
    ("default_max_grad_norm", "grad_clipping: TrainingArguments(max_grad_norm=1) clips every update's gradient "
                              "(Trainer's default is 1.0) but the paper does not clip; pass max_grad_norm=0"),
    ("sampler_split_twice", "data_split_twice: the sampler splits the data 2 ways and the prepared loader splits "
                            "it 2 ways again"),
    ("trainer_weight_decay", "norm_weight_decay: weight decay 0.0001 on"),
    ("model_computes_loss", "loss_unchecked: compute_loss is not GoyalTrainer's"),
])
def test_mistakes_stop_at_the_first_update(trainer_runs, name, message):
    result = json.loads((trainer_runs / f"{name}.json").read_text())
    assert result["error"] is not None and result["error"].startswith(message), result["error"]
    assert "\n" not in result["error"]
    assert result["updates"] == 0


def test_resume_that_ignores_the_data_skip_stops_at_its_first_update(trainer_runs):
    result = json.loads((trainer_runs / "resume_ignoring_data_skip.json").read_text())
    assert result["error"] is not None and result["error"].startswith(
        "data_position: the LR is at update 2 (epoch 0, update 2 of 3) but the data at epoch 0, sample 0 "), result
    assert "\n" not in result["error"]
    assert result["updates"] == 2  # the restored count: no update after the resume


def test_global_batch_loss_inside_the_model_is_not_used(trainer_runs):
    """GoyalTrainer computes the loss from the logits and never passes labels: the model's own
    kn-normalised loss, which Trainer would divide by the accumulation steps again, plays no part."""
    from safetensors.torch import load_file

    result = json.loads((trainer_runs / "global_batch_loss_in_model.json").read_text())
    assert result == {"error": None, "updates": 3}
    _assert_parameters_equal(load_file(trainer_runs / "global_batch_loss_in_model.safetensors"),
                             _reference_parameters(3, torch.float64), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# In one process


def test_recipe_parts_on_a_timm_wrapper(tmp_path):
    from transformers import TimmWrapperForImageClassification, Trainer

    from goyal_recipe import GhostBatchNorm2d

    plain = example.make_model()
    keys = set(plain.state_dict())
    trainer = example.build_trainer(tmp_path)
    model = trainer.model
    assert isinstance(model, TimmWrapperForImageClassification)
    assert set(model.state_dict()) == keys  # ghost BN keeps the checkpoint layout
    ghost = [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]
    assert ghost and all(m.group_size == 4 for m in ghost)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    last_bns = [m for name, m in model.named_modules() if name.endswith(".bn2")]
    assert last_bns and all(not m.weight.any() for m in last_bns)  # zero-gamma in each block's last BN
    optimizer = trainer.create_optimizer()
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    norm = {name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for name in (f"{name}.weight", f"{name}.bias")}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.0 if name in norm else 1e-4), name
    # Trainer's own filter (LayerNorm, names with bias/norm) would decay the BN gamma of this timm ResNet.
    trainer_decays = set(Trainer.get_decay_parameter_names(trainer, model))
    assert {"timm_model.bn1.weight", "timm_model.layer1.0.bn2.weight"} <= trainer_decays & norm
    assert trainer.global_batch_size == N * STEPS and trainer.updates_per_epoch == SAMPLES // (N * STEPS)
    scheduler = trainer.create_scheduler(num_training_steps=12)
    assert isinstance(scheduler, GoyalLR) and scheduler.get_last_lr()[0] == pytest.approx(0.1)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="per_device_train_batch_size=6 is not a multiple of bn_group_size=4"):
        example.build_trainer(tmp_path, per_device_train_batch_size=6)
    from goyal_recipe import Schedule
    from goyal_recipe.integrations.transformers import GoyalTrainer

    with pytest.raises(UserError, match="the schedule's global_batch_size=64 is not this run's kn"):
        GoyalTrainer(model=example.make_model(), args=example.training_arguments(tmp_path),
                     train_dataset=example.GeneratedImages(), bn_group_size=4,
                     schedule=Schedule(global_batch_size=64, epochs=2, warmup_epochs=1, milestones=()))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
