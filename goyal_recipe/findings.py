"""A departure from the paper that the audit found: its stable code, its one-line message with the fix, and
whether it is silent (changes the update with no other symptom: the integrations refuse it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import RecipeMismatch


@dataclass(frozen=True)
class Finding:
    code: str  # stable snake_case id
    message: str  # one line: where the loop departs from the paper, and the fix
    silent: bool  # changes the update with no other symptom: the integrations refuse it

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def refuse_silent(findings: list[Finding]) -> None:
    """Raise `RecipeMismatch` naming the first silent finding (and the codes of the others); no-op if none."""
    silent = [f for f in findings if f.silent]
    if not silent:
        return
    more = f" (and {len(silent) - 1} more: {', '.join(f.code for f in silent[1:])})" if len(silent) > 1 else ""
    raise RecipeMismatch(f"{silent[0]}{more}")


def allowed(findings: list[Finding], allow: Iterable[str]) -> list[Finding]:
    """The findings with those whose code is in `allow` kept as reported, not refused."""
    allow = set(allow)
    return [dataclasses.replace(f, silent=False) if f.code in allow else f for f in findings]


def names_shown(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
