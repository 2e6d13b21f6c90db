"""The recipe config: typed defaults (the one source of them), YAML recipes, dotted overrides.

Units are in the names: `*_epochs` in passes over the training set, `*_updates` in optimizer
updates, `*_batch_size` in images, `*_s` in seconds. The global minibatch kn is the one number that
defines a run; per-device micro-batch, world size and accumulation are derived from it and checked.
The docstring under each field is its one-line meaning: `goyal-train --show-config` prints it.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import UserError
from .schedule import Schedule


class ConfigError(UserError):
    """A recipe or override that cannot run; the message names the key and the fix."""


def _non_finite(value, key: str = "") -> str | None:
    """The dotted key of the first non-finite float in `value` (a setting, or a list or mapping of them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for sub, item in items:
        found = _non_finite(item, f"{key}.{sub}" if key else str(sub))
        if found is not None:
            return found
    return None


class _Section(BaseModel):
    # allow_inf_nan=False: every float setting is finite (an LR of inf trains NaN weights without an error);
    # the check below covers untyped values (model.kwargs) too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    @model_validator(mode="after")
    def _every_number_finite(self):
        for name in type(self).model_fields:
            value = getattr(self, name)
            key = None if isinstance(value, BaseModel) else _non_finite(value, name)
            if key is not None:
                raise PydanticCustomError("finite_number", "Input should be a finite number", {"key": key})
        return self


class RunConfig(_Section):
    name: str = "run"
    """Run directory is `<output_dir>/<name>`."""
    output_dir: str = "runs"
    """Directory holding the run directories."""
    seed: int = 0
    """Seeds the data order, augmentation and model init."""
    resume: str = "none"
    """"none", "auto" (newest complete checkpoint of this run, if any) or a checkpoint directory."""
    log_every_updates: int = Field(10, ge=1)
    """A progress line and a step record in metrics.jsonl every this many updates."""
    checkpoint_every_updates: int = Field(0, ge=0)
    """Checkpoint inside epochs every this many updates; 0: only at the end of each epoch."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept (the newest); older ones are deleted."""
    eval_every_epochs: int = Field(1, ge=0)
    """Evaluate on the validation set every this many epochs (and after the last); 0: no evaluation."""
    max_updates: int | None = Field(None, ge=1)
    """Stop (with a checkpoint) after this many updates in total; for smoke tests and time limits."""
    trackers: list[Literal["tensorboard"]] = []
    """Experiment trackers that also receive the metrics (tensorboard needs the tracking extra)."""
    plots: bool = True
    """Draw plots/*.png (error, loss, LR curves) at the end of the run."""
    max_consecutive_nonfinite: int = Field(3, ge=0)
    """Updates with a non-finite loss or gradient are skipped (all ranks agree); more in a row stops the run."""
    keep_freed_cpu_memory: bool = True
    """On a CPU device, keep freed memory in the process for the next update instead of returning it
    to the kernel (glibc's mallopt; about 9 % faster updates); the process keeps its peak heap size."""
    collective_timeout_s: int = Field(1800, ge=1)
    """A rank waiting longer than this in a collective (e.g. for a dead peer) fails instead of hanging."""
    noise_scale: bool = True
    """Measure the gradient noise scale B_simple (McCandlish et al. 2018) from each update's own gradients:
    logged as noise_scale, noise_grad_sq, noise_trace_sigma; needs world size x accumulation steps >= 2."""
    noise_scale_every_updates: int = Field(4, ge=1)
    """Measure the noise scale on every N-th update: its two passes over the gradients cost about 2 % of a
    CPU update of a small-image model when taken every update (N = 1), far less on a GPU."""
    noise_scale_ema_decay: float = Field(0.95, ge=0, lt=1)
    """Decay of the moving averages of |G|^2 and tr(Sigma) over measurements (0.95: about the last 20)."""


class GenerateConfig(_Section):
    """A generated dataset written to `data.root` when it is not there yet (`goyal-data generate`)."""

    num_classes: int = Field(10, ge=2)
    """Classes of the generated dataset."""
    train_per_class: int = Field(100, ge=1)
    """Training images per class."""
    val_per_class: int = Field(20, ge=1)
    """Validation images per class."""
    image_width: int = Field(64, ge=8)
    """Width of the generated JPEGs."""
    image_height: int = Field(48, ge=8)
    """Height of the generated JPEGs."""
    difficulty: float = Field(0.5, ge=0, le=1)
    """0: classes trivially separable; 1: hardest to tell apart."""
    seed: int = 0
    """Seeds the generated images."""


class DataConfig(_Section):
    source: Literal["imagefolder", "parquet", "hf"] = "imagefolder"
    """Where the images come from: JPEG class folders, parquet shards with image bytes, or a Hugging Face dataset."""
    root: str = "data/imagenet"
    """ImageNet layout: `<root>/train/<synset>/*.JPEG` and `<root>/val/<synset>/*.JPEG`; parquet: `<root>/parquet`."""
    hf_name: str | None = None
    """For source=hf: a dataset name in the local Hugging Face cache (e.g. imagenet-1k)."""
    allow_download: bool = False
    """For source=hf: let the datasets library download what the local cache lacks."""
    generate: GenerateConfig | None = None
    """Generate a dataset at data.root when it is not there yet (quickstart, tests); None: use data.root as it is."""
    image_size: int = Field(224, ge=8)
    """Training crop; evaluation resizes to image_size * 256/224 and centre-crops image_size."""
    crop_min_area: float = Field(0.08, gt=0, le=1)
    """Smallest fraction of the image area a random-resized crop covers."""
    color_jitter: float = Field(0.0, ge=0)
    """Strength of brightness, contrast and saturation jitter; 0: off."""
    pca_lighting: float = Field(0.0, ge=0)
    """Standard deviation of AlexNet-style PCA lighting noise; 0: off."""
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
    """Channels-last memory format (faster convolutions on GPUs with tensor cores)."""
    compile: bool = False
    """torch.compile the model (falls back to eager where the backend is missing)."""


class BatchConfig(_Section):
    global_batch_size: int = Field(256, ge=1)
    """kn: images per optimizer update over all devices and accumulation micro-batches."""
    per_device_batch_size: int = Field(32, ge=1)
    """Images per device per forward pass (one accumulation micro-batch)."""


class OptimConfig(_Section):
    optimizer: Literal["sgd", "folded_sgd", "lars", "lamb"] = "sgd"
    """sgd: torch.optim.SGD (eq. 9); folded_sgd: LR inside the velocity (eq. 10) with momentum correction;
    lars, lamb: timm's Lars and Lamb (You et al. 2017, 2019), BN and biases excluded from decay and trust ratio."""
    trust_coefficient: float = Field(0.001, gt=0)
    """lars: the trust coefficient eta of the layer-wise LR eta |w| / (|g| + lambda |w|) (You et al. 2017)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum m of eq. (9)."""
    nesterov: bool = True
    """Nesterov momentum."""
    momentum_correction: bool = True
    """folded_sgd: scale the velocity by lr_new / lr_old when the LR changes (eq. 10)."""
    weight_decay: float = Field(1e-4, ge=0)
    """L2 weight decay lambda of the weights (eq. 8)."""
    norm_weight_decay: float = Field(0.0, ge=0)
    """Weight decay of BN scales and shifts."""
    bias_weight_decay: float | None = Field(None, ge=0)
    """Weight decay of biases; None: the same as weight_decay."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy; 0 in the paper."""
    base_lr: float = Field(0.1, gt=0)
    """LR of the reference minibatch base_batch_size."""
    base_batch_size: int = Field(256, ge=1)
    """The reference minibatch of base_lr; LR = base_lr x global_batch_size / base_batch_size (linear scaling)."""
    scaling: Literal["linear", "sqrt", "none"] = "linear"
    """How the LR grows with global_batch_size: linear (the paper's rule), sqrt, or none."""
    warmup: Literal["gradual", "constant", "none"] = "gradual"
    """gradual: LR ramps linearly to its peak over warmup_epochs (Sec. 2.2); constant: base LR, then the jump."""
    warmup_epochs: float = Field(5.0, ge=0)
    """Length of the warmup."""
    warmup_start_lr: float | None = Field(None, ge=0)
    """LR at the start of the warmup; None: base_lr, the LR of the reference minibatch."""
    decay: Literal["step", "cosine", "poly", "none"] = "step"
    """After the warmup: step (x gamma at each milestone), cosine, poly (polynomial to 0), or none."""
    poly_power: float = Field(2.0, gt=0)
    """Power of the poly decay (2 in You et al.'s LARS ResNet-50 runs)."""
    milestones: list[float] = [30, 60, 80]
    """Epochs at which step decay multiplies the LR by gamma."""
    gamma: float = Field(0.1, gt=0)
    """Step decay factor."""
    epochs: int = Field(90, ge=1)
    """Length of training."""
    grad_clip_norm: float | None = Field(None, gt=0)
    """Clip the global gradient norm before each update; None (the paper): no clipping."""


class DebugConfig(_Section):
    """Switches for finding faults in the loop (and for its tests); a run for results leaves them off."""

    log_samples: bool = False
    """Write the sample indices of every update per rank to samples_rank<r>.jsonl (check data coverage)."""
    inject_nonfinite_updates: list[int] = []
    """Fault injection: the loss of these updates (1-based loop iterations) is made NaN on the last rank."""


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
    engine: Literal["accelerate", "deepspeed", "local"] = "accelerate"
    """What drives the loop: accelerate (DDP), DeepSpeed (under its launcher or accelerate's plugin), or local
    (one CPU process, no launcher or process group: for debugging a recipe in a debugger, and the loop's tests)."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    debug: DebugConfig = DebugConfig()

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
                        milestones=tuple(o.milestones), gamma=o.gamma, epochs=o.epochs, poly_power=o.poly_power)

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (SafeLoader keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                if first is not None:
                    where = self.name if self.name.startswith("override") else f"{self.name}, lines {first} and {line}"
                    raise ConfigError(f"key {key!r} is given twice in one mapping ({where}); keep one")
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem and line in one line ("found ... at line 3, column 1")."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def safe_load(text: str, name: str):
    """yaml.safe_load with duplicate mapping keys refused."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.warmup=constant", "batch.global_batch_size=8192"]` -> nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value; write e.g. optim.warmup=constant")
        try:
            value = safe_load(raw, f"override {item}") if raw.strip() else None
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


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the last part of `loc` (e.g. OptimConfig for ("optim", "warmpu"))."""
    model: type[BaseModel] = RecipeConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        sections = _sections(field.annotation)
        if not sections:
            return None
        model = sections[0]
    return model


# Keys that moved to another section, and where they are now.
_MOVED = {"run.log_samples": "debug.log_samples", "run.inject_nonfinite_updates": "debug.inject_nonfinite_updates"}


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = first["loc"]
    inner = first.get("ctx", {}).get("key") if first["type"] == "finite_number" else None
    if inner:  # found by a section's check of its untyped values: the input is the section
        loc = (*loc, *(int(p) if p.isdigit() else p for p in inner.split(".")))
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    if not key:  # a check across fields: the message names them
        return message
    if first["type"] == "extra_forbidden":
        if key in _MOVED:
            return f"unknown key {key}; it is now {_MOVED[key]}"
        section = _section_at(loc)
        close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields) if section else [], n=1)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = (f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close
                else "see goyal-train --show-config RECIPE for every key")
        return f"unknown key {key}; {hint}"
    if first["type"] == "finite_number":
        got = "" if inner else f" (got {first['input']!r})"
        return f"{key} must be a finite number{got}; set a finite value"
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
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = e.object[:e.start].count(b"\n") + 1
            raise ConfigError(f"recipe {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}, "
                              f"line {line}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"recipe {path} cannot be read ({e.strerror}); check its permissions") from None
        try:
            tree = safe_load(text, str(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections (run, data, model, batch, optim)")
    tree = _merge(tree, parse_overrides(list(overrides)))
    try:
        return RecipeConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def dump_config(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Units of a setting, from the end of its name (the naming convention of this module).
_UNIT_SUFFIXES = (("_epochs", "epochs"), ("_updates", "updates"), ("_batch_size", "images"),
                  ("_group_size", "images"), ("_per_class", "images"), ("_timeout_s", "seconds"), ("_s", "seconds"),
                  ("image_size", "pixels"), ("image_width", "pixels"), ("image_height", "pixels"),
                  ("workers", "processes per device"))
_UNIT_NAMES = {"milestones": "epochs", "epochs": "epochs"}


def unit_of(name: str) -> str:
    """The unit of setting `name` ("" for a number without one, a choice or a switch)."""
    if name in _UNIT_NAMES:
        return _UNIT_NAMES[name]
    return next((unit for suffix, unit in _UNIT_SUFFIXES if name.endswith(suffix)), "")


def _sections(annotation) -> list[type[BaseModel]]:
    """The config classes an annotation names (`GenerateConfig | None` -> [GenerateConfig])."""
    return [a for a in (typing.get_args(annotation) or (annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)]


def config_rows(cfg: RecipeConfig) -> list[tuple[str, str, str, str, str]]:
    """(key, resolved value, default, unit, one-line meaning) of every setting, from the models' fields."""
    rows = []

    def shown(value) -> str:
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()

    def walk(model: type[BaseModel], values: BaseModel | None, prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            value = getattr(values, name) if values is not None else None
            section = _sections(field.annotation)
            default = field.get_default(call_default_factory=True)
            if section and isinstance(default, BaseModel):  # a section: its keys, not itself
                walk(section[0], value, key + ".")
                continue
            meaning = " ".join((field.description or "").split())
            meaning = re.split(r"(?<=\.)\s+(?=[A-Z`])", meaning)[0].removesuffix(".")  # its first sentence
            if section and value is not None:
                text = "set (keys below)"
            else:
                text = shown(value) if values is not None else "-"
            rows.append((key, text, shown(default), unit_of(name), meaning))
            if section:  # an optional section (data.generate): its keys, with values where it is set
                walk(section[0], value, key + ".")

    walk(RecipeConfig, cfg, "")
    return rows


def describe_config(cfg: RecipeConfig) -> str:
    """The table `goyal-train --show-config` prints: every key, its value, default, unit and meaning."""
    header = ("key", "value", "default", "unit", "meaning")
    rows = [header, *config_rows(cfg)]
    widths = [min(max(len(row[i]) for row in rows), 40) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
                     for row in rows)
