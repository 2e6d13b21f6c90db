"""engine=deepspeed: the same run as one process of the recipe's reference (engine=local, accelerate's maths on one
process) under the deepspeed launcher and accelerate's DeepSpeed plugin, non-finite updates included."""

import glob
import json
import shutil

import pytest
import torch

from _loop import run_local
from _runs import (EPOCHS, EXPECTED_LR, REPO, free_port, overrides, parameters, records, samples_by_epoch, step_losses,
                   train)
from goyal_recipe.config import ConfigError, load_config

pytest.importorskip("deepspeed")
from goyal_recipe.engines.deepspeed import ds_config  # noqa: E402


# The last rank's loss is NaN at updates 3 and 6 in every run: a skipped update must leave no gradient, momentum,
# LR count or accumulation phase behind for the updates after it to equal the reference's.
NAN = {"debug.inject_nonfinite_updates": "[3,6]"}


@pytest.fixture(scope="module")
def ds_runs(data_root, tmp_path_factory):
    """The reference: 1 process x 2 accumulation micro-batches (engine=local, in this process); DeepSpeed ZeRO-0
    as 2 processes under the deepspeed launcher; DeepSpeed ZeRO-1 as 1 process x 2 micro-batches, keeping a
    checkpoint of every 2 updates."""
    out = tmp_path_factory.mktemp("ds_runs")
    run_local(data_root, out, "reference", **NAN)
    (out / "port").write_text(str(port := free_port()))
    train(overrides(data_root, out, "zero0", engine="deepspeed", **NAN), launcher="deepspeed", port=port)
    train(overrides(data_root, out, "zero1", **{"engine": "deepspeed", "deepspeed.zero_stage": 1, **NAN,
                                                "run.checkpoint_every_updates": 2, "run.keep_checkpoints": 6}))
    return out


def test_deepspeed_launcher_lr_coverage_and_validation(ds_runs):
    run_dir = ds_runs / "zero0"
    assert records(run_dir, "run")[0]["world_size"] == 2
    assert [r["lr"] for r in records(run_dir, "step")] == pytest.approx(EXPECTED_LR[:10], rel=1e-12)
    by_epoch = samples_by_epoch(run_dir, ranks=(0, 1))
    assert sorted(by_epoch) == list(range(EPOCHS))
    for seen in by_epoch.values():
        assert sorted(seen) == list(range(64))  # each sample once per epoch across both ranks
    assert [r["val_images"] for r in records(run_dir, "epoch")] == [20] * EPOCHS


def test_deepspeed_cpu_shared_memory_is_removed_at_the_end(ds_runs):
    """DeepSpeed's CPU all-reduce makes a /dev/shm buffer per rank (66 MB) that it never removes; the engine's
    end removes it. Any file there named with the launcher run's port counts, whatever DeepSpeed calls it."""
    port = (ds_runs / "port").read_text()
    assert not glob.glob(f"/dev/shm/*_{port}_*")


@pytest.mark.parametrize("run", ["zero0", "zero1"])
def test_parity_with_one_process(ds_runs, run):
    reference, other = parameters(ds_runs / "reference"), parameters(ds_runs / run)
    assert reference.keys() == other.keys() and len(reference) == 44
    for key in reference:
        torch.testing.assert_close(other[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    assert step_losses(ds_runs / run) == pytest.approx(step_losses(ds_runs / "reference"), rel=1e-4)


@pytest.mark.parametrize("run", ["zero0", "zero1"])
def test_nonfinite_updates_are_skipped_as_in_the_reference(ds_runs, run):
    """DeepSpeed (ZeRO-0 on 2 ranks, ZeRO-1 with accumulation) drops updates 3 and 6 as the reference does, and
    counts them as its own overflow skips."""
    run_dir = ds_runs / run
    assert [r["update"] for r in records(run_dir, "skip")] == [3, 6]
    assert sorted(step_losses(run_dir)) == [1, 2, 4, 5, 7, 8, 9, 10, 11, 12]
    assert [r["lr"] for r in records(run_dir, "step")] == pytest.approx(EXPECTED_LR[:10], rel=1e-12)
    checkpoint = run_dir / "checkpoints" / "update_000000012"
    assert torch.load(checkpoint / "trainer.pt", weights_only=True)["scheduler"]["updates_done"] == 10
    # DeepSpeed's own count, as after its overflow skips: 12 boundaries, 2 of them skipped.
    # Its checkpoint format is pickled; this one was written by the run above.
    ds_state = torch.load(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
    assert (ds_state["global_steps"], ds_state["skipped_steps"]) == (12, 2)


def test_resume_under_deepspeed_equals_uninterrupted(ds_runs, data_root, tmp_path):
    """ZeRO-1's checkpoint of update 6 (inside epoch 2, after the skipped update 6) resumed by a new process: the
    updates after it are the uninterrupted run's."""
    checkpoint = ds_runs / "zero1" / "checkpoints" / "update_000000006"
    assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "deepspeed").is_dir()
    shutil.copytree(checkpoint, tmp_path / "zero1" / "checkpoints" / checkpoint.name)
    proc = train(overrides(data_root, tmp_path, "zero1", **{"engine": "deepspeed", "deepspeed.zero_stage": 1,
                                                            "run.resume": "auto", **NAN}))
    assert "at update 6" in proc.stdout
    resumed, uninterrupted = step_losses(tmp_path / "zero1"), step_losses(ds_runs / "zero1")
    assert sorted(resumed) == [7, 8, 9, 10, 11, 12]
    assert resumed == pytest.approx({update: uninterrupted[update] for update in resumed}, rel=1e-6)
    resumed, reference = parameters(tmp_path / "zero1"), parameters(ds_runs / "zero1")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)


def _plugin_env():
    """The variables `accelerate launch` gives its workers for accelerate_configs/deepspeed_zero1.yaml, from
    accelerate's own launch code (resolved, not started)."""
    from accelerate.commands import launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch.launch_command_parser().parse_args(
        ["--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero1.yaml"), "-m", "goyal_recipe.cli"])
    args, _, _ = launch._validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ""  # set by launch_command before it builds the environment
    return prepare_deepspeed_cmd_env(args)[1]


def test_accelerate_deepspeed_plugin_trains_and_checks_the_zero_stage(data_root, tmp_path, monkeypatch):
    """One update under the plugin's launch; the engines' refusals under the environment that launch gives (a
    ZeRO stage other than the recipe's; engine=accelerate under the DeepSpeed plugin), before any process group."""
    from goyal_recipe.engines.accelerate import AccelerateEngine
    from goyal_recipe.engines.deepspeed import DeepSpeedEngine

    args = overrides(data_root, tmp_path, "plugin", **{"engine": "deepspeed", "deepspeed.zero_stage": 1,
                                                       "run.max_updates": 1})
    train(args, launcher="accelerate-deepspeed")
    assert [r["lr"] for r in records(tmp_path / "plugin", "step")] == pytest.approx(EXPECTED_LR[:1])
    env = _plugin_env()
    assert (env["ACCELERATE_USE_DEEPSPEED"], env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]) == ("true", "1")
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.setenv(key, env[key])
    recipe = REPO / "recipes" / "quickstart.yaml"
    with pytest.raises(ConfigError, match="zero_stage=1 but the recipe has deepspeed.zero_stage=0"):
        DeepSpeedEngine(load_config(recipe, ["engine=deepspeed", "deepspeed.zero_stage=0"]))
    with pytest.raises(ConfigError, match="add engine=deepspeed"):
        AccelerateEngine(load_config(recipe, ["engine=accelerate"]))


def test_ds_config_follows_the_recipe(tmp_path):
    cfg = load_config("recipes/resnet50_kn8k.yaml", ["engine=deepspeed", "deepspeed.zero_stage=1"])
    config = ds_config(cfg, world_size=8)
    assert {k: config[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                   "gradient_accumulation_steps", "gradient_clipping")} == {
        "train_batch_size": 8192, "train_micro_batch_size_per_gpu": 256, "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.0}
    assert config["zero_optimization"] == {"stage": 1} and config["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in config and "scheduler" not in config and "bf16" not in config
    assert ds_config(cfg, world_size=32)["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("user,error", [
    ({"communication_data_type": "fp32", "train_batch_size": "auto", "gradient_clipping": "auto",
      "zero_optimization": {"reduce_bucket_size": 5e7}}, None),
    ({"train_batch_size": 4096}, "sets train_batch_size=4096 but the recipe gives 8192"),
    # The update the paper makes does not clip: a file's clipping is refused, not merged over the recipe's 0.
    ({"gradient_clipping": 1.0}, "sets gradient_clipping=1.0 but the recipe gives 0.0; remove it from the file and "
                                 "set optim.grad_clip_norm"),
    ({"optimizer": {"type": "Adam"}}, "sets 'optimizer', which the recipe owns"),
    ({"bf16": {"enabled": True}}, "sets 'bf16', which the recipe owns; remove it and set model.precision"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2 but the recipe has deepspeed.zero_stage=0"),
])
def test_user_ds_config_file(tmp_path, user, error):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = load_config("recipes/resnet50_kn8k.yaml", ["engine=deepspeed", f"deepspeed.config_file={path}"])
    if error is None:
        config = ds_config(cfg, world_size=8)
        assert config["communication_data_type"] == "fp32" and config["train_batch_size"] == 8192
        assert config["gradient_clipping"] == 0.0
        assert config["zero_optimization"] == {"reduce_bucket_size": 5e7, "stage": 0}
    else:
        with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
            ds_config(cfg, world_size=8)
