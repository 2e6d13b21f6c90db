"""The experiment design of `goyal-replicate`: which runs a mode trains, each as one typed recipe.

Every run is `recipes/replication/base.yaml` plus only what the paper changes between its runs (kn,
the warmup, the LR scaling rule, the zero-gamma init) and, in the scaling study, the optimizer. A
`Setting` holds those few fields; `Mode` the scale (data set size, epochs and milestones in the
paper's 90 / 30, 60, 80 proportions, warmup, BN group, the kn range, seeds). `build_runs` renders
both to recipe overrides in one place and validates them once into a `RecipeConfig` per run, which
the runner trains and the report reads; nothing parses an override back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import RecipeConfig, load_config

BASE_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "replication" / "base.yaml"
IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_EPOCHS = 90
PAPER_ERROR_EPOCHS = 5
"""A run's error in the paper is the median of its last 5 of 90 epochs; modes keep that share."""

# Top-1 validation error (%) of ResNet-50 on ImageNet in the paper (Table 1, Fig. 1/5, Sec. 5).
PAPER_TABLE1 = {"baseline": (23.60, 0.12), "none": (24.84, 0.37), "constant": (25.88, 0.56),
                "gradual": (23.74, 0.09)}
PAPER_TABLE1_KN = 8192
PAPER_TABLE1_RUNS = 5
PAPER_ERROR_BY_KN = {128: 23.49, 256: 23.60, 512: 23.48, 1024: 23.53, 2048: 23.49, 4096: 23.56, 8192: 23.74,
                     16384: 24.79, 32768: 27.55, 65536: 33.96}
PAPER_ABLATIONS = {"no_scaling": 41.67, "sqrt_scaling": 26.22, "gamma_one": 24.11}

LARS_TRUST_COEFFICIENT = 0.02
"""The trust coefficient of every LARS run, fixed for every kn: NVIDIA apex's `LARC` default, whose scaling mode
(clip=False) is the layer LR eta x trust x |w| / (|g| + lambda |w|) (eta: the global LR) of timm's `Lars`. You et al.'s 0.001
goes with a global LR tuned per kn far above the linear rule; under the linear rule, with the median layer
|g| / |w| at 0.031 after one SGD epoch at kn = 32, it would step about 30 times less than SGD, and 0.02 about 0.65
times as much (0.02 / 0.031)."""


@dataclass(frozen=True)
class Setting:
    """One point of the design: kn and the things the experiments vary."""

    global_batch_size: int
    warmup: str = "gradual"
    scaling: str = "linear"
    zero_gamma: bool = True
    optimizer: str = "sgd"

    @property
    def name(self) -> str:
        gamma = "zerogamma" if self.zero_gamma else "gamma1"
        suffix = "" if self.optimizer == "sgd" else f"-{self.optimizer}"
        return f"kn{self.global_batch_size}-{self.warmup}-{self.scaling}-{gamma}{suffix}"

    def overrides(self) -> list[str]:
        """The base recipe's keys this setting changes."""
        trust = [f"optim.trust_coefficient={LARS_TRUST_COEFFICIENT:g}"] if self.optimizer == "lars" else []
        return [f"batch.global_batch_size={self.global_batch_size}", f"optim.warmup={self.warmup}",
                f"optim.scaling={self.scaling}", f"model.zero_init_last={str(self.zero_gamma).lower()}",
                f"optim.optimizer={self.optimizer}", *trust]


@dataclass(frozen=True)
class Mode:
    """The scale of a sweep. Epoch counts follow the paper's proportions (90 / 30, 60, 80 / 5 warmup)."""

    description: str
    train_per_class: int
    val_per_class: int
    epochs: int
    milestones: tuple[float, ...]
    warmup_epochs: float
    baseline_kn: int
    large_kn: int
    """The Table 1 and ablation kn: the largest kn whose updates per epoch are near the paper's limit (8k: 156)."""
    sweep_kn: tuple[int, ...]
    ablations: tuple[str, ...]
    seeds: tuple[int, ...]
    max_micro_batch: int
    """Per-device micro-batch cap: kn above it is reached by gradient accumulation."""
    workers: int
    """Loader workers per run."""
    eval_every_epochs: int = 1
    """The last epoch is always evaluated, and a run's error needs only the last ones."""
    table1_seeds: tuple[int, ...] | None = None
    """Seeds of the Table 1 settings where they differ from `seeds` (the paper ran 5)."""
    sweep_optimizers: tuple[str, ...] = ("sgd",)
    """Optimizers of the error-against-kn sweep; each point runs once per optimizer, nothing else changed."""
    bn_group_size: int = 32
    """n: images per BN statistics group at every kn."""
    min_micro_batches: int = 1
    """Gradients per update at the least (micro-batch <= kn / this): the noise scale needs two."""
    step_records_per_epoch: int | None = None
    """Step records (loss, LR, noise scale) per epoch at every kn, the noise scale then measured on every
    update; None: the base recipe's logging and measuring cadence, in updates."""

    def settings(self) -> list[Setting]:
        """Every distinct run setting of the mode, in report order; a setting shared by two tables runs once."""
        sweep = [Setting(kn, optimizer=o) for o in self.sweep_optimizers for kn in self.sweep_kn]
        ablation = {"no_scaling": Setting(self.large_kn, scaling="none"),
                    "sqrt_scaling": Setting(self.large_kn, scaling="sqrt"),
                    "gamma_one": Setting(self.large_kn, zero_gamma=False)}
        return list(dict.fromkeys(self.table1_settings() + sweep + [ablation[a] for a in self.ablations]))

    def table1_settings(self) -> list[Setting]:
        return [Setting(self.baseline_kn)] + [Setting(self.large_kn, warmup=w) for w in ("none", "constant", "gradual")]

    def seeds_of(self, setting: Setting) -> tuple[int, ...]:
        """A Table 1 setting runs `table1_seeds` (with `seeds` if it is a sweep point too); others `seeds`."""
        if self.table1_seeds is None or setting not in self.table1_settings():
            return self.seeds
        return tuple(sorted(set(self.table1_seeds) | set(self.seeds)))

    def micro_batch(self, global_batch_size: int) -> int:
        return min(global_batch_size // self.min_micro_batches, self.max_micro_batch)

    def logging_overrides(self, global_batch_size: int, train_images: int) -> list[str]:
        if self.step_records_per_epoch is None:
            return []
        updates_per_epoch = train_images // global_batch_size
        every = max(1, updates_per_epoch // self.step_records_per_epoch)
        return [f"run.log_every_updates={every}", "run.noise_scale_every_updates=1"]

    @property
    def error_epochs(self) -> int:
        return max(1, round(self.epochs * PAPER_ERROR_EPOCHS / PAPER_EPOCHS))


MODES = {
    "quick": Mode(
        description="a reduced design that runs in under 15 minutes on 2 CPU cores",
        train_per_class=40, val_per_class=20, epochs=9, milestones=(3, 6, 8), warmup_epochs=0.5,
        baseline_kn=32, large_kn=128, sweep_kn=(32, 128, 512), ablations=("no_scaling", "sqrt_scaling"),
        seeds=(0, 1, 2), max_micro_batch=128, workers=0, eval_every_epochs=3),
    "cpu": Mode(
        description="Table 1 in the paper's 8k regime (125 updates per epoch), about an hour on 2 CPU cores",
        train_per_class=160, val_per_class=20, epochs=9, milestones=(3, 6, 8), warmup_epochs=0.5,
        baseline_kn=32, large_kn=128, sweep_kn=(32, 128), ablations=(),
        seeds=(0, 1, 2), max_micro_batch=128, workers=0),
    "full": Mode(
        description="the whole design, for a GPU (about a day on 2 CPU cores)",
        train_per_class=1280, val_per_class=50, epochs=18, milestones=(6, 12, 16), warmup_epochs=1,
        baseline_kn=32, large_kn=1024, sweep_kn=(32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
        ablations=("no_scaling", "sqrt_scaling", "gamma_one"), seeds=(0, 1, 2), max_micro_batch=256, workers=6),
    # Where linear scaling ends (McCandlish et al. 2018; You et al. 2017): the cpu mode's 16,000 images, kn from
    # 500 to 7 updates per epoch, SGD and LARS at each kn with nothing else changed. BN groups of 16, not 32: the
    # noise scale needs two gradients per update, and kn = 32 then still holds two micro-batches of a whole group.
    "scaling": Mode(
        description="where linear scaling ends: SGD and LARS against kn with the noise scale measured, and Table 1 "
                    "with 5 seeds, about 2.5 hours on 2 CPU cores",
        train_per_class=160, val_per_class=20, epochs=9, milestones=(3, 6, 8), warmup_epochs=0.5,
        baseline_kn=32, large_kn=128, sweep_kn=(32, 128, 256, 512, 1024, 2048), ablations=(), seeds=(0, 1, 2),
        max_micro_batch=128, workers=0, table1_seeds=(0, 1, 2, 3, 4), sweep_optimizers=("sgd", "lars"),
        bn_group_size=16, min_micro_batches=2, step_records_per_epoch=10),
}


@dataclass(frozen=True)
class Run:
    """One training run: a setting at one seed, its recipe validated once."""

    setting: Setting
    seed: int
    name: str
    run_dir: Path
    config: RecipeConfig
    overrides: tuple[str, ...]
    """What `config` adds to the base recipe, for the record (the config is what runs)."""


def _listing(values: Sequence[Any]) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "]"


def mode_overrides(mode_name: str, runs_dir: Path) -> list[str]:
    """The base recipe's keys a mode sets for all its runs: the scale."""
    mode = MODES[mode_name]
    data_root = Path("data") / "generated" / f"replication-{mode_name}"
    return [f"data.root={data_root}", f"data.generate.train_per_class={mode.train_per_class}",
            f"data.generate.val_per_class={mode.val_per_class}", f"data.workers={mode.workers}",
            f"run.eval_every_epochs={mode.eval_every_epochs}", f"model.bn_group_size={mode.bn_group_size}",
            f"optim.epochs={mode.epochs}", f"optim.milestones={_listing(mode.milestones)}",
            f"optim.warmup_epochs={mode.warmup_epochs:g}", f"run.output_dir={runs_dir / mode_name}"]


def build_runs(mode_name: str, runs_dir: Path, seeds: Sequence[int] | None = None,
               base_recipe: Path = BASE_RECIPE) -> list[Run]:
    """The runs of a mode: each setting once per seed (`seeds` replaces the mode's), each a validated recipe."""
    mode = MODES[mode_name]
    common = mode_overrides(mode_name, runs_dir)
    classes = load_config(base_recipe, common).data.generate.num_classes
    runs = []
    for setting in mode.settings():
        kn = setting.global_batch_size
        for seed in mode.seeds_of(setting) if seeds is None else seeds:
            name = f"{setting.name}-seed{seed}"
            overrides = (*common, *setting.overrides(), f"batch.per_device_batch_size={mode.micro_batch(kn)}",
                         *mode.logging_overrides(kn, classes * mode.train_per_class), f"run.seed={seed}",
                         f"run.name={name}")
            config = load_config(base_recipe, list(overrides))
            runs.append(Run(setting, seed, name, config.run_dir, config, overrides))
    return runs
