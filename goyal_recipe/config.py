"""The recipe config: typed defaults (the one source of them), YAML recipes, dotted overrides.

Units are in the names: `*_epochs` in passes over the training set, `*_updates` in optimizer
updates, `*_batch_size` in images. The global minibatch kn is the one number that defines a run;
per-device micro-batch, world size and accumulation are derived from it and checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .schedule import Schedule


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "run"
    """Run directory is `<output_dir>/<name>`."""
    output_dir: str = "runs"
    seed: int = 0
    """Seeds the data order, augmentation and model init."""
    resume: str = "none"
    """"none", "auto" (newest complete checkpoint of this run, if any) or a checkpoint directory."""
    log_every_updates: int = Field(10, ge=1)
    checkpoint_every_updates: int = Field(0, ge=0)
    """0: only at the end of each epoch."""
    keep_checkpoints: int = Field(2, ge=1)
    eval_every_epochs: int = Field(1, ge=0)
    """0: no evaluation."""
    max_updates: int | None = Field(None, ge=1)
    """Stop (with a checkpoint) after this many updates in total; for smoke tests and time limits."""
    trackers: list[Literal["tensorboard"]] = []
    plots: bool = True
    log_samples: bool = False
    """Write the sample indices of every update per rank to samples_rank<r>.jsonl (debugging, tests)."""
    max_consecutive_nonfinite: int = Field(3, ge=0)
    """Updates with a non-finite loss or gradient are skipped (all ranks agree); more in a row stops the run."""
    keep_freed_cpu_memory: bool = True
    """On a CPU device, keep freed memory in the process for the next update instead of returning it
    to the kernel (glibc's mallopt; about 9 % faster updates); the process keeps its peak heap size."""
    collective_timeout_s: int = Field(1800, ge=1)
    """A rank waiting longer than this in a collective (e.g. for a dead peer) fails instead of hanging."""
    inject_nonfinite_updates: list[int] = []
    """Fault injection for tests: the loss of these updates (1-based) is made NaN on the last rank."""


class GenerateConfig(_Section):
    """A generated dataset written to `data.root` when it is not there yet (`goyal-data generate`)."""

    num_classes: int = Field(10, ge=2)
    train_per_class: int = Field(100, ge=1)
    val_per_class: int = Field(20, ge=1)
    image_width: int = Field(64, ge=8)
    image_height: int = Field(48, ge=8)
    difficulty: float = Field(0.5, ge=0, le=1)
    seed: int = 0


class DataConfig(_Section):
    source: Literal["imagefolder", "parquet", "hf"] = "imagefolder"
    root: str = "data/imagenet"
    """ImageNet layout: `<root>/train/<synset>/*.JPEG` and `<root>/val/<synset>/*.JPEG`; parquet: `<root>/parquet`."""
    hf_name: str | None = None
    """For source=hf: a dataset name in the local Hugging Face cache (e.g. imagenet-1k)."""
    allow_download: bool = False
    generate: GenerateConfig | None = None
    image_size: int = Field(224, ge=8)
    """Training crop; evaluation resizes to image_size * 256/224 and centre-crops image_size."""
    crop_min_area: float = Field(0.08, gt=0, le=1)
    color_jitter: float = Field(0.0, ge=0)
    pca_lighting: float = Field(0.0, ge=0)
    workers: int = Field(8, ge=0)
    """Loader worker processes per device."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Per device; default: per_device_batch_size."""
    bad_images: Literal["fail", "skip"] = "fail"
    """An image that cannot be decoded: "fail" stops the run naming the file; "skip" trains on the next
    decodable sample in its place (deterministic, counted; evaluation leaves it out). `goyal-data
    validate ROOT` lists every bad file beforehand."""
    decode_draft: bool = True
    """Decode a JPEG at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling via PIL's draft) when the crop allows it:
    the largest reduction at which the crop box, counted in reduced pixels, still has at least image_size
    pixels in both dimensions (evaluation: the shorter side at least image_size * 256/224). The resize after
    it then never upsamples where the full decode did not; the crop box (drawn from the header size with the
    same RNG draws) is unchanged and the pixels differ by resampling noise only. false: always full size."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """Where JPEGs are decoded. cpu: in the loader workers (libjpeg-turbo via torchvision or, drafted and for
    other formats, PIL), which hand uint8 crops to the main process; each batch is converted to float, lit
    (data.pca_lighting, with the workers' draws) and normalised on the training device. gpu: workers read
    the bytes and draw the crop; the main process decodes each batch on the training device with nvjpeg
    (torchvision.io.decode_jpeg) and crops, resizes, flips and normalises there, taking the cpu path (same
    crop) for files it cannot decode (CMYK, PNG, corrupt). Without CUDA the stage runs on the CPU after a
    one-line warning: the same images (so a GPU recipe can be tried on a CPU machine), but slower than cpu,
    as one process decodes what the workers would."""


class ModelConfig(_Section):
    name: str = "resnet50"
    """Any timm model name."""
    kwargs: dict[str, Any] = {}
    """Extra keyword arguments of `timm.create_model`, e.g. {channels: [16, 32, 64, 128]} for a narrow ResNet."""
    num_classes: int | None = Field(None, ge=2)
    """Default: the number of classes of the data."""
    zero_init_last: bool = True
    """gamma = 0 in the last BN of each residual block (Sec. 5.1); false for the gamma = 1 ablation."""
    fc_init_std: float | None = 0.01
    """Classifier weights ~ N(0, std^2), bias 0, as in the paper; None keeps timm's init."""
    bn: Literal["ghost", "per_device", "sync"] = "ghost"
    """ghost: statistics over bn_group_size samples; per_device: over the micro-batch; sync: over all devices."""
    bn_group_size: int = Field(32, ge=1)
    """n of the paper: images per BN statistics group (ghost mode)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the forward pass; BN statistics and optimizer state stay fp32."""
    channels_last: bool = False
    compile: bool = False


class BatchConfig(_Section):
    global_batch_size: int = Field(256, ge=1)
    """kn: images per optimizer update over all devices and accumulation micro-batches."""
    per_device_batch_size: int = Field(32, ge=1)
    """Images per device per forward pass (one accumulation micro-batch)."""


class OptimConfig(_Section):
    optimizer: Literal["sgd", "folded_sgd"] = "sgd"
    """sgd: torch.optim.SGD (eq. 9); folded_sgd: LR inside the velocity (eq. 10) with momentum correction."""
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    momentum_correction: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    norm_weight_decay: float = Field(0.0, ge=0)
    bias_weight_decay: float | None = Field(None, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    base_lr: float = Field(0.1, gt=0)
    """LR of the reference minibatch base_batch_size."""
    base_batch_size: int = Field(256, ge=1)
    scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup: Literal["gradual", "constant", "none"] = "gradual"
    warmup_epochs: float = Field(5.0, ge=0)
    warmup_start_lr: float | None = Field(None, ge=0)
    decay: Literal["step", "cosine", "none"] = "step"
    milestones: list[float] = [30, 60, 80]
    gamma: float = Field(0.1, gt=0)
    epochs: int = Field(90, ge=1)
    grad_clip_norm: float | None = Field(None, gt=0)
    """Clip the global gradient norm before each update; None (the paper): no clipping."""


class DeepSpeedConfig(_Section):
    """Settings of engine=deepspeed. The batch chain, optimizer, LR and precision come from the recipe."""

    zero_stage: Literal[0, 1] = 0
    """0: plain data parallel; 1: optimizer state sharded. ResNet-50's 25M parameters and SGD's one
    momentum buffer (100 MB in fp32) fit every GPU, so sharding only adds communication."""
    config_file: str | None = None
    """A ds_config JSON whose fields are added to the generated one; batch fields must agree with the recipe."""


class RecipeConfig(_Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    engine: Literal["accelerate", "deepspeed"] = "accelerate"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _schedule_is_valid(self):
        try:
            self.schedule()
        except ValueError as e:
            # Schedule names its field first ("milestones [...] must ..."): name the recipe key.
            field = re.match(r"\w*", str(e)).group()
            raise ValueError(f"optim.{e}" if field in OptimConfig.model_fields else f"optim: {e}") from None
        return self

    def schedule(self) -> Schedule:
        o = self.optim
        return Schedule(global_batch_size=self.batch.global_batch_size, base_lr=o.base_lr,
                        base_batch_size=o.base_batch_size, scaling=o.scaling, warmup=o.warmup,
                        warmup_epochs=o.warmup_epochs, warmup_start_lr=o.warmup_start_lr, decay=o.decay,
                        milestones=tuple(o.milestones), gamma=o.gamma, epochs=o.epochs)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


@dataclass(frozen=True)
class BatchPlan:
    """The batch chain of a launched run: kn = per_device_batch_size x world_size x accumulation_steps."""

    global_batch_size: int
    per_device_batch_size: int
    world_size: int
    accumulation_steps: int
    bn_group_size: int
    """Images per BN statistics group (the paper's n)."""

    @property
    def bn_groups_per_update(self) -> int:
        """The paper's k: independent BN groups per update (its number of workers)."""
        return self.global_batch_size // self.bn_group_size


def plan_batches(cfg: RecipeConfig, world_size: int) -> BatchPlan:
    """Derive and check the batch chain for `world_size` devices."""
    kn, n = cfg.batch.global_batch_size, cfg.batch.per_device_batch_size
    per_update = n * world_size
    if kn % per_update:
        lower, upper = (kn // per_update) * per_update, math.ceil(kn / per_update) * per_update
        raise ConfigError(
            f"batch.global_batch_size={kn} is not divisible by per_device_batch_size x world size = {n} x {world_size}; "
            f"set batch.global_batch_size to a multiple of {per_update} (e.g. {upper}"
            + (f" or {lower}" if lower else "") + ") or change batch.per_device_batch_size"
        )
    m = cfg.model
    if m.bn == "ghost":
        group = m.bn_group_size
        if group > n or n % group:
            raise ConfigError(
                f"model.bn_group_size={group} does not divide batch.per_device_batch_size={n}; "
                "choose a BN group that divides the per-device micro-batch (the paper uses 32)"
            )
    elif m.bn == "sync":
        group = n * world_size
    else:
        group = n
    return BatchPlan(kn, n, world_size, kn // per_update, group)


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.warmup=constant", "batch.global_batch_size=8192"]` -> nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value; write e.g. optim.warmup=constant")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not key:  # a check across fields: the message names them
        return message
    if first["type"] == "extra_forbidden":
        return f"unknown key {key}; check the spelling against the documented recipe keys"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or first["type"] == "value_error" else f" (got {got!r})"
    more = f" [+{error.error_count() - 1} more]" if error.error_count() > 1 else ""
    return f"{key}: {message}{shown}{more}"


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> RecipeConfig:
    """Typed defaults <- YAML recipe <- dotted overrides. Raises ConfigError with one line."""
    tree: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path} not found; pass a YAML file such as recipes/quickstart.yaml")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections (run, data, model, batch, optim)")
    tree = _merge(tree, parse_overrides(list(overrides)))
    try:
        return RecipeConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def dump_config(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
