"""Bad input of every class a user can cause (recipe, override, data, checkpoint, launch): one line naming the
cause and the fix, exit code 2, no traceback, and nothing left on disk that was not there before."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from goyal_recipe.checkpoint import MARKER
from goyal_recipe.cli import train_main
from goyal_recipe.config import load_config, plan_batches
from goyal_recipe.data.generate import generate_dataset
from goyal_recipe.errors import UserError
from goyal_recipe.model import build_model
from goyal_recipe.optim import param_groups


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(root, num_classes=4, train_per_class=8, val_per_class=2, image_size=(32, 24), formats=("jpeg",))
    return root


def base_recipe(tiny_root, output_dir) -> dict:
    return {
        "run": {"name": "bad", "output_dir": str(output_dir), "plots": False},
        "data": {"root": str(tiny_root), "image_size": 32, "workers": 0},
        "model": {"name": "resnet10t", "bn_group_size": 4},
        "batch": {"global_batch_size": 16, "per_device_batch_size": 8},
        "optim": {"base_lr": 0.05, "base_batch_size": 4, "epochs": 3, "warmup_epochs": 1, "milestones": [2]},
    }


# (case id, overrides, text the one error line must hold: the key, and the fix where there is one)
OVERRIDES = [
    ("unknown top-level key", ["optimizer.lr=0.1"], "unknown key optimizer; did you mean optim?"),
    ("unknown nested key", ["optim.warmpu=constant"], "unknown key optim.warmpu; did you mean optim.warmup?"),
    ("unknown key in a subsection", ["data.generate.train_per_clas=3"],
     "unknown key data.generate.train_per_clas; did you mean data.generate.train_per_class?"),
    ("unknown key, nothing close", ["data.generate.colour=red"],
     "unknown key data.generate.colour; see goyal-train --show-config RECIPE for every key"),
    ("value set below a scalar", ["optim.epochs.max=3"], "optim.epochs"),
    ("wrong type: int", ["batch.global_batch_size=many"], "batch.global_batch_size"),
    ("wrong type: bool", ["model.zero_init_last=perhaps"], "model.zero_init_last"),
    ("wrong type: list", ["optim.milestones=two"], "optim.milestones"),
    ("wrong choice", ["optim.warmup=linear"], "optim.warmup"),
    ("negative LR", ["optim.base_lr=-0.1"], "optim.base_lr"),
    ("zero LR", ["optim.base_lr=0"], "optim.base_lr"),
    ("zero global batch", ["batch.global_batch_size=0"], "batch.global_batch_size"),
    ("negative per-device batch", ["batch.per_device_batch_size=-8"], "batch.per_device_batch_size"),
    ("zero epochs", ["optim.epochs=0"], "optim.epochs"),
    ("momentum of 1", ["optim.momentum=1.0"], "optim.momentum"),
    ("milestones out of order", ["optim.milestones=[2, 1.5]"], "optim.milestones must be strictly increasing"),
    ("milestone past the end", ["optim.milestones=[2, 3]"], "optim.milestones [2.0, 3.0] must lie in"),
    ("warmup longer than training", ["optim.warmup_epochs=4"], "optim.warmup_epochs=4.0 is not shorter than training"),
    ("unknown engine", ["engine=horovod"], "engine"),
    ("unknown data source", ["data.source=lmdb"], "data.source"),
    ("unknown bad-image policy", ["data.bad_images=ignore"], "data.bad_images"),
    ("zero log interval", ["run.log_every_updates=0"], "run.log_every_updates"),
    ("infinite LR", ["optim.base_lr=.inf"], "optim.base_lr must be a finite number (got inf)"),
    ("LR overflowing to inf", ["optim.base_lr=1e400"], "optim.base_lr must be a finite number (got '1e400')"),
    ("infinite optional float", ["optim.warmup_start_lr=.inf"], "optim.warmup_start_lr must be a finite number"),
    ("infinite list item", ["optim.milestones=[1, .inf]"], "optim.milestones[1] must be a finite number"),
    ("infinite untyped setting", ["model.kwargs={drop_rate: -.inf}"], "model.kwargs.drop_rate must be a finite number"),
    ("NaN", ["data.crop_min_area=.nan"], "data.crop_min_area must be a finite number"),
    ("duplicate key in an override", ["model.kwargs={drop_rate: 0.1, drop_rate: 0.2}"],
     "key 'drop_rate' is given twice in one mapping (override model.kwargs="),
    ("test hook moved to the debug section", ["run.inject_nonfinite_updates=[3]"],
     "unknown key run.inject_nonfinite_updates; it is now debug.inject_nonfinite_updates"),
    ("unknown debug key", ["debug.log_sample=true"], "unknown key debug.log_sample; did you mean debug.log_samples?"),
    ("override without =", ["optim.warmup"], "override 'optim.warmup' is not key=value"),
    ("override with an empty key", ["=3"], "override '=3' is not key=value"),
    # These pass config loading and fail in the trainer, before it writes anything.
    ("kn not divisible by world x n", ["batch.global_batch_size=20"],
     "batch.global_batch_size=20 is not divisible by per_device_batch_size x world size = 8 x 1"),
    ("BN group not dividing n", ["model.bn_group_size=3"], "model.bn_group_size=3 does not divide batch.per_device_batch_size=8"),
    ("missing data root", ["data.root={tmp}/nowhere"], "data root {tmp}/nowhere does not exist; point data.root at"),
    ("unknown model name", ["model.name=resnet9000"], "model.name='resnet9000' is not a timm model"),
    ("model kwargs the model does not take", ["model.kwargs={wings: 2}"], "model.kwargs {'wings': 2} do not fit"),
    ("model kwargs the constructor rejects with a KeyError", ["model.kwargs={act_layer: sparkle}"],
     "model.kwargs {'act_layer': 'sparkle'} do not fit resnet10t (KeyError: 'sparkle')"),
    ("model kwargs the constructor rejects with an AttributeError", ["model.kwargs={block: 3}"],
     "model.kwargs {'block': 3} do not fit resnet10t (AttributeError:"),
    # Found after the run directory was made: what the run created is removed.
    ("resume path that does not exist", ["run.resume={tmp}/old/checkpoints/update_000000004"],
     "run.resume={tmp}/old/checkpoints/update_000000004 does not exist; give a checkpoint directory"),
]

# (case id, recipe file text or None for a missing file, text the error must hold)
RECIPE_FILES = [
    ("recipe is a list, not a mapping", "- run\n- optim\n", "recipe {recipe} must be a mapping of sections"),
    ("recipe is a scalar", "resnet50\n", "recipe {recipe} must be a mapping of sections"),
    ("invalid YAML", "optim: {base_lr: 0.1\nbatch: [\n", "recipe {recipe} is not valid YAML"),
    ("missing recipe file", None, "recipe {recipe} not found; pass a YAML file"),
    ("recipe section is not a mapping", "optim: 0.1\n", "optim"),
    ("unknown key in the recipe", "optim:\n  lr: 0.1\n", "unknown key optim.lr"),
    ("not UTF-8", b"optim:\n  base_lr: 0.1  # \xe9t\xe9\n", "recipe {recipe} is not UTF-8 text (byte 0xe9 at offset 25, line 2); save it as UTF-8"),
    ("duplicate key", "optim:\n  base_lr: 0.1\n  epochs: 3\n  base_lr: 0.2\n",
     "key 'base_lr' is given twice in one mapping ({recipe}, lines 2 and 4); keep one"),
    ("duplicate section", "optim: {epochs: 3}\nrun: {seed: 1}\noptim: {base_lr: 0.2}\n",
     "key 'optim' is given twice in one mapping ({recipe}, lines 1 and 3)"),
    ("infinite number in the recipe", "optim:\n  base_lr: .inf\n", "optim.base_lr must be a finite number (got inf)"),
]


def check_one_line_error(capsys, code: int, expected: str, run_root) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("goyal-train: error: "), captured.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not run_root.exists(), sorted(p.name for p in run_root.rglob("*"))  # nothing written


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in OVERRIDES], ids=[c[0] for c in OVERRIDES])
def test_bad_override(tiny_root, tmp_path, capsys, overrides, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_root, tmp_path / "runs")))
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    code = train_main([str(recipe), *overrides])
    check_one_line_error(capsys, code, expected.replace("{tmp}", str(tmp_path)), tmp_path / "runs")


@pytest.mark.parametrize("text,expected", [c[1:] for c in RECIPE_FILES], ids=[c[0] for c in RECIPE_FILES])
def test_bad_recipe_file(tiny_root, tmp_path, capsys, text, expected):
    recipe = tmp_path / "recipe.yaml"
    if isinstance(text, bytes):
        recipe.write_bytes(text)
    elif text is not None:
        recipe.write_text(text)
    code = train_main([str(recipe), f"run.output_dir={tmp_path / 'runs'}", f"data.root={tiny_root}"])
    check_one_line_error(capsys, code, expected.replace("{recipe}", str(recipe)), tmp_path / "runs")


def test_the_base_recipe_is_valid(tiny_root, tmp_path):
    """The cases above fail because of their one change, not because the base is broken."""
    from goyal_recipe.config import load_config, plan_batches

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_root, tmp_path / "runs")))
    cfg = load_config(recipe)
    assert plan_batches(cfg, 1).accumulation_steps == 2


# --- Checkpoints: a file that is corrupt (not hostile), or of another model ----------------------------------

def _checkpoint(tiny_root, directory, corrupt: str):
    """A complete checkpoint of the base recipe's model, written as the trainer writes one, with one file spoilt."""
    recipe = directory.parent / "recipe.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_root, directory)))
    cfg = load_config(recipe)
    model = build_model(cfg.model, 4, plan_batches(cfg, 1), 1)
    o = cfg.optim  # the recipe's weight-decay groups, as the trainer builds them
    optimizer = torch.optim.SGD(param_groups(model, weight_decay=o.weight_decay, norm_weight_decay=o.norm_weight_decay,
                                             bias_weight_decay=o.bias_weight_decay), lr=0.1, momentum=0.9)
    directory.mkdir(parents=True)
    torch.save({"update": 2, "world_size": 1}, directory / "trainer.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / MARKER).write_text("2\n")
    if corrupt == "model.safetensors":
        (directory / "model.safetensors").write_bytes(b"\x00" * 64)
    elif corrupt == "optimizer.pt":
        data = (directory / "optimizer.pt").read_bytes()
        (directory / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif corrupt == "trainer.pt":
        (directory / "trainer.pt").write_bytes(b"")
    elif corrupt == "buffers_rank0.safetensors":
        (directory / corrupt).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    elif corrupt == "old version":
        torch.save({"update": 2}, directory / "trainer.pt")
    elif corrupt == "another model":
        save_file({"fc.weight": torch.zeros(3, 3)}, directory / "model.safetensors")


CHECKPOINTS = [
    ("model.safetensors that is not safetensors", "model.safetensors",
     "{ckpt}/model.safetensors is corrupt or truncated ("),
    ("truncated optimizer.pt", "optimizer.pt", "{ckpt}/optimizer.pt is corrupt or truncated ("),
    ("empty trainer.pt", "trainer.pt", "{ckpt}/trainer.pt is corrupt or truncated ("),
    ("weights of another model", "another model", "{ckpt}/model.safetensors does not fit this model ("),
    ("written by another version", "old version", "{ckpt} has no per-rank state (written by another version"),
    ("a rank's buffers truncated", "buffers_rank0.safetensors",
     "{ckpt}/buffers_rank0.safetensors is corrupt or truncated"),
]


@pytest.mark.parametrize("corrupt,expected", [c[1:] for c in CHECKPOINTS], ids=[c[0] for c in CHECKPOINTS])
def test_corrupt_checkpoint(tiny_root, tmp_path, capsys, corrupt, expected):
    checkpoint = tmp_path / "old" / "checkpoints" / "update_000000002"
    _checkpoint(tiny_root, checkpoint, corrupt)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_root, tmp_path / "runs")))
    code = train_main([str(recipe), f"run.resume={checkpoint}"])
    check_one_line_error(capsys, code, expected.replace("{ckpt}", str(checkpoint)), tmp_path / "runs")


def test_checkpoint_of_another_batch_size(tiny_root, tmp_path, capsys):
    """A real checkpoint (one update of kn=16) resumed with kn=8: refused, the new run leaves nothing."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_root, tmp_path / "old")))
    assert train_main([str(recipe), "run.max_updates=1"]) == 0
    checkpoint = tmp_path / "old" / "bad" / "checkpoints" / "update_000000001"
    capsys.readouterr()
    code = train_main([str(recipe), f"run.output_dir={tmp_path / 'runs'}", f"run.resume={checkpoint}",
                       "batch.global_batch_size=8"])
    check_one_line_error(capsys, code, "the checkpoint was written with batch.global_batch_size=16 and 2 updates per "
                         "epoch, this run has 8 and 4", tmp_path / "runs")


def test_an_error_keeps_what_an_earlier_run_left(tiny_root, tmp_path, capsys):
    """A failed start in an existing run directory removes what it made there, and nothing else."""
    run_dir = tmp_path / "runs" / "bad"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"kind": "run"}\n')
    before = {p: p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_root, tmp_path / "runs")))
    code = train_main([str(recipe), f"run.resume={tmp_path / 'nowhere'}"])
    captured = capsys.readouterr()
    assert code == 2 and len(captured.err.strip().splitlines()) == 1 and "does not exist" in captured.err
    assert {p: p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")} == before


def test_bad_image_found_while_training(tiny_root, tmp_path, capsys):
    """data.bad_images=fail stops at the first undecodable image with one line naming it; the run had written its
    config and log, and they are removed (no checkpoint yet)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    for image in (root / "train").rglob("*.JPEG"):
        image.write_bytes(b"not a JPEG")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(root, tmp_path / "runs")))
    code = train_main([str(recipe)])
    check_one_line_error(capsys, code, f"cannot decode image {root / 'train'}", tmp_path / "runs")


def test_every_user_error_class_is_one(tmp_path):
    """The classes the CLI turns into one line all derive from UserError (one except clause catches them)."""
    from goyal_recipe.checkpoint import CheckpointError
    from goyal_recipe.config import ConfigError
    from goyal_recipe.data.sources import BadImageError
    from goyal_recipe.engines.base import LaunchError, TrainingDiverged

    for cls in (ConfigError, BadImageError, CheckpointError, LaunchError, TrainingDiverged):
        assert issubclass(cls, UserError), cls


# --- Launch: the command a CPU user tries first ------------------------------------------------------------

def test_accelerate_launch_num_processes_without_multi_gpu_is_refused(tiny_root, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` starts one process (its single-process launcher): refused with the
    command that starts two, before anything is written."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_root, tmp_path / "runs")))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU")}
    proc = subprocess.run([accelerate, "launch", "--num_processes", "2", "--cpu", "-m", "goyal_recipe.cli", "train",
                           str(recipe)], env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("goyal-train: error:")]
    # accelerate's launcher shows its own traceback (CalledProcessError) for a worker that exits 2; none of ours.
    assert proc.returncode != 0 and "goyal_recipe/" not in proc.stderr.replace(errors[0] if errors else "", ""), \
        proc.stderr[-2000:]
    assert len(errors) == 1 and "accelerate launch started 1 process where more were asked" in errors[0]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in errors[0]
    assert not (tmp_path / "runs").exists()


# --- Discoverable settings ---------------------------------------------------------------------------------

def test_show_config_lists_every_key_with_value_default_unit_and_meaning(tiny_root, tmp_path, capsys):
    from pydantic import BaseModel

    from goyal_recipe.config import RecipeConfig
    from goyal_recipe.config_table import config_rows

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_root, tmp_path / "runs")))
    overrides = ["optim.warmup=constant", "data.generate={num_classes: 3}"]
    assert train_main(["--show-config", str(recipe), *overrides]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    rows = {row[0]: row[1:] for row in config_rows(load_config(recipe, overrides))}
    assert printed == list(rows)

    def leaves(model, prefix=""):  # every key of the typed defaults, sections opened
        for name, field in model.model_fields.items():
            sections = [a for a in (getattr(field.annotation, "__args__", None) or (field.annotation,))
                        if isinstance(a, type) and issubclass(a, BaseModel)]
            if not sections or not isinstance(field.default, BaseModel):
                yield prefix + name
            for section in sections:
                yield from leaves(section, f"{prefix}{name}.")

    assert list(rows) == list(leaves(RecipeConfig)) and len(rows) > 60
    # (value, default, unit, meaning): the value resolved from the recipe and the overrides
    assert rows["optim.warmup"][:3] == ("constant", "gradual", "")
    assert rows["optim.warmup"][3].startswith("gradual: LR ramps linearly to its peak over warmup_epochs")
    assert rows["optim.warmup_epochs"][:3] == ("1.0", "5.0", "epochs")
    assert rows["batch.global_batch_size"][:3] == ("16", "256", "images")
    assert rows["run.collective_timeout_s"][:3] == ("1800", "1800", "seconds")
    assert rows["data.image_size"][:3] == ("32", "224", "pixels")
    assert rows["data.generate.num_classes"][:2] == ("3", "10")
    assert rows["model.bn_group_size"] == ("4", "32", "images", "n of the paper: images per BN statistics group "
                                                                "(ghost mode)")
    short = [key for key, row in rows.items() if len(row[3]) < 12]
    assert not short, short  # every key has a meaning
    assert not (tmp_path / "runs").exists()
