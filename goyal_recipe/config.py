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
from typing import Literal

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from .config_sections import (BatchConfig, DataConfig, DebugConfig, DeepSpeedConfig, GenerateConfig,  # noqa: F401
                              ModelConfig, OptimConfig, RunConfig, _Section)
from .errors import UserError
from .schedule import Schedule


class ConfigError(UserError):
    """A recipe or override that cannot run; the message names the key and the fix."""


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
        sections = section_classes(field.annotation)
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


def section_classes(annotation) -> list[type[BaseModel]]:
    """The config classes an annotation names (`GenerateConfig | None` -> [GenerateConfig])."""
    return [a for a in (typing.get_args(annotation) or (annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)]
