"""Malformed recipes and overrides: one line naming the key, exit code 2, no traceback, no run directory."""

import pytest
import yaml

from goyal_recipe.cli import train_main
from goyal_recipe.data.generate import generate_dataset


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
    ("unknown top-level key", ["optimizer.lr=0.1"], "unknown key optimizer"),
    ("unknown nested key", ["optim.warmpu=constant"], "unknown key optim.warmpu"),
    ("unknown key in a subsection", ["data.generate.colour=red"], "unknown key data.generate.colour"),
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
    ("override without =", ["optim.warmup"], "override 'optim.warmup' is not key=value"),
    ("override with an empty key", ["=3"], "override '=3' is not key=value"),
    # These pass config loading and fail in the trainer, before it writes anything.
    ("kn not divisible by world x n", ["batch.global_batch_size=20"],
     "batch.global_batch_size=20 is not divisible by per_device_batch_size x world size = 8 x 1"),
    ("BN group not dividing n", ["model.bn_group_size=3"], "model.bn_group_size=3 does not divide batch.per_device_batch_size=8"),
    ("missing data root", ["data.root={tmp}/nowhere"], "data root {tmp}/nowhere does not exist; point data.root at"),
    ("unknown model name", ["model.name=resnet9000"], "model.name='resnet9000' is not a timm model"),
    ("model kwargs the model does not take", ["model.kwargs={wings: 2}"], "model.kwargs {'wings': 2} do not fit"),
]

# (case id, recipe file text or None for a missing file, text the error must hold)
RECIPE_FILES = [
    ("recipe is a list, not a mapping", "- run\n- optim\n", "recipe {recipe} must be a mapping of sections"),
    ("recipe is a scalar", "resnet50\n", "recipe {recipe} must be a mapping of sections"),
    ("invalid YAML", "optim: {base_lr: 0.1\nbatch: [\n", "recipe {recipe} is not valid YAML"),
    ("missing recipe file", None, "recipe {recipe} not found; pass a YAML file"),
    ("recipe section is not a mapping", "optim: 0.1\n", "optim"),
    ("unknown key in the recipe", "optim:\n  lr: 0.1\n", "unknown key optim.lr"),
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
    if text is not None:
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
