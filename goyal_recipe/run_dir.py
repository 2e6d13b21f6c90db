"""The run directory: checked writable before any work, and left as found when a start fails."""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import ConfigError


def preflight(run_dir: Path) -> None:
    """Fail before any work if the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}); set run.output_dir to a writable path") from None


class NewPaths:
    """What a run adds under its run directory (and the parents it makes), to remove when it fails with a
    UserError before its first checkpoint: a failed start leaves the disk as it found it, and never touches
    what an earlier run left there."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.made_dirs = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
        self.before = set(run_dir.rglob("*")) if run_dir.is_dir() else set()

    def remove(self) -> None:
        if self.run_dir.is_dir():
            for path in sorted(set(self.run_dir.rglob("*")) - self.before, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for directory in self.made_dirs:
            try:
                directory.rmdir()
            except OSError:  # not empty (another process wrote there) or already gone
                break
