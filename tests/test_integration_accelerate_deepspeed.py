"""examples/accelerate_loop.py under accelerate's DeepSpeed plugin (`accelerate launch` with a DeepSpeed
config, 2 CPU processes, gloo): with a DeepSpeed config file that turns clipping off, ZeRO-1 gives every rank
the schedule's LR at every update and one process's parameters; with the shipped yaml, whose
`gradient_clipping: 0.0` accelerate leaves out (DeepSpeed then clips at 1.0), the loop is refused at its
first update."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("deepspeed")

from _reference import (TOTAL_UPDATES, check_every_sample_once_per_epoch_in_the_trainers_blocks,  # noqa: E402
                        check_lr_of_every_update, mlp_reference, saved_parameters)
from goyal_recipe.errors import RecipeMismatch  # noqa: E402

import accelerate_loop as example  # noqa: E402 - examples/, on the path through _reference

REPO = Path(__file__).resolve().parents[1]
NO_CLIPPING = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
               "gradient_accumulation_steps": "auto", "gradient_clipping": 0.0,
               "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}


def launch(config: Path, out: Path) -> None:
    # Not ACCELERATE_USE_CPU: it would turn the DeepSpeed plugin off. DS_ACCELERATOR=cpu runs DeepSpeed on gloo.
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate_deepspeed")
    (out / "ds_config.json").write_text(json.dumps(NO_CLIPPING))
    # The shipped yaml with its DeepSpeed settings moved into a config file, where a 0 stays a 0.
    config = yaml.safe_load((REPO / "accelerate_configs" / "deepspeed_zero1.yaml").read_text())
    config["deepspeed_config"] = {"deepspeed_config_file": str(out / "ds_config.json"), "zero3_init_flag": False}
    del config["mixed_precision"]  # the config file's to say, accelerate insists
    (out / "zero1_file.yaml").write_text(yaml.safe_dump(config))
    (out / "shipped").mkdir()
    (out / "file").mkdir()
    launch(REPO / "accelerate_configs" / "deepspeed_zero1.yaml", out / "shipped")
    launch(out / "zero1_file.yaml", out / "file")
    return out


def test_zero1_through_a_config_file_is_the_papers_update(runs):
    out = runs / "file" / "run"
    check_lr_of_every_update(out)
    check_every_sample_once_per_epoch_in_the_trainers_blocks(out)
    expected = mlp_reference(TOTAL_UPDATES)[0][-1]
    got = saved_parameters(out / "params_final.pt")
    for name, value in got.items():  # DeepSpeed reduces float32 gradients
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_noise_scale_under_the_plugin_is_refused_not_left_empty(runs):
    for rank in (0, 1):
        assert (runs / "file" / f"noise_error_rank{rank}.txt").read_text().startswith(
            "noise_scale_every_updates is not measured under accelerate's DeepSpeed plugin")


def test_the_shipped_yaml_clips_and_is_refused(runs):
    # Its gradient_accumulation_steps: 1 (goyal-train's engine derives its own) is not the example's 2 either.
    error = (runs / "shipped" / "error.txt").read_text()
    assert error.startswith("grad_clipping: the DeepSpeed engine clips gradients at norm 1 ")
    assert error.endswith("set \"gradient_clipping\": 0 in a DeepSpeed config file (deepspeed_config_file; accelerate "
                          "drops gradient_clipping: 0 from its yaml) (and 2 more: deepspeed_accumulation, "
                          "samples_per_update)")


if __name__ == "__main__":  # OUT: the example under the launching config; a refusal's message to OUT/error.txt
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    out = Path(sys.argv[1])

    def on_gloo(**kwargs):
        # On a CPU accelerate's DeepSpeed plugin starts no process group without a backend named.
        handlers = [*kwargs.pop("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(kwargs_handlers=handlers, **kwargs)

    example.Accelerator = on_gloo
    from goyal_recipe.errors import UserError
    from goyal_recipe.integrations.accelerate import AccelerateRecipe

    try:  # the noise scale asked for under the plugin
        AccelerateRecipe(on_gloo(gradient_accumulation_steps=2), example.schedule(example.GLOBAL_BATCH_SIZE),
                         num_samples=64, per_device_batch_size=8, noise_scale_every_updates=1)
    except UserError as exc:
        (out / f"noise_error_rank{os.environ['RANK']}.txt").write_text(str(exc))
    try:
        example.main(["--dtype", "float32", "--out", str(out / "run"), "--noise-scale-every-updates", "0"])
    except RecipeMismatch as exc:
        if int(os.environ["RANK"]) == 0:
            (out / "error.txt").write_text(str(exc))
    torch.distributed.destroy_process_group()  # gloo's threads abort the process at exit otherwise
