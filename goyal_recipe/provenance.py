"""Where a result came from: the machine, the library versions, the commit and the date.

Benchmark records and replication reports carry this next to their figures, so a number is never
read without the hardware and software that produced it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(),
               "memory_gib": round(props.total_memory / 2**30, 1)}
    memory_gib = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory_gib = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": memory_gib,
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "os": platform.platform()}


def describe_machine(machine: dict) -> str:
    """One line: '2-core AMD EPYC ..., 24 GiB, no GPU'."""
    gpu = machine.get("gpu")
    gpus = f"{gpu['count']}x {gpu['name']}" if gpu else "no GPU"
    memory = f", {machine['memory_gib']:g} GiB" if machine.get("memory_gib") else ""
    return f"{machine['usable_cores']}-core {machine['cpu']}{memory}, {gpus}"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is simply absent from the record
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "timm": _version("timm"), "torchvision": _version("torchvision"), "accelerate": _version("accelerate"),
            "goyal_recipe": _version("goyal_recipe"), "git": git_commit()}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
