"""The error types a user can cause, and only those.

Everything a user can fix (a recipe, an override, data, a checkpoint, a launch, a loop that departs
from the paper) raises a `UserError` whose message is one line naming the cause and the fix. The
console scripts catch `UserError` in one place: one line on stderr, exit code 2, no traceback.
Anything else is a bug in this project and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; `str()` is one line naming the cause and the fix."""


class RecipeMismatch(UserError):
    """A training loop departs from the paper's update in a way nothing else would report.

    Raised by the integrations at the first update, with the audit's one-line finding.
    """
