"""The table of every recipe setting that `goyal-train --show-config` prints: key, resolved value, default, unit
and one-line meaning, read from the config models' fields and docstrings (config.py and config_sections.py)."""

from __future__ import annotations

import re

import yaml
from pydantic import BaseModel

from .config import RecipeConfig, section_classes


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
            section = section_classes(field.annotation)
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
