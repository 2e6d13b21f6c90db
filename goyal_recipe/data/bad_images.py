"""The bad-image policy (`data.bad_images`): an image that cannot be decoded stops the run or is substituted.

fail: the `BadImageError` naming the file propagates (through DataLoader workers as the same one line).
skip: the next index (cyclically) whose image decodes stands in, with its own label, and the sample
is flagged bad. The substitute is a function of the index alone, so resume, loader workers and world
size do not change what is seen, and the sampler's sample count and rank split stay as they are. The
trainer counts the flags; each process warns once per bad file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from ..errors import UserError

BAD_IMAGE_POLICIES = ("fail", "skip")
MAX_BAD_RUN = 100  # a longer run of failures is broken data, not a few bad files

# What PIL raises for data it cannot decode: unknown format or truncated stream (OSError), broken
# headers (SyntaxError, ValueError, EOFError), and an image over PIL's pixel limit
# (DecompressionBombError, raised from the header before any pixel is decoded; the limit is kept).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

log = logging.getLogger(__name__)
Row = TypeVar("Row")


class BadImageError(UserError):
    """An image that cannot be decoded; ``str()`` is one line naming the file, the reason and the fix.

    ``path`` and ``reason`` are set where it is raised. A DataLoader re-raises a worker's exception
    as ``type(e)(caught text + worker traceback)``; the constructor keeps only the original line,
    so the error that reaches the main process is still the one line with the path.
    """

    def __init__(self, message: str, path: str | None = None, reason: str | None = None):
        if path is None and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split("BadImageError: ", 1)[-1]
        super().__init__(message)
        self.path, self.reason = path, reason

    @classmethod
    def at(cls, path: str, reason: str) -> BadImageError:
        return cls(f"cannot decode image {path}: {reason}; remove or replace the file (`goyal-data validate ROOT` "
                   "lists every bad one) or set data.bad_images=skip to train on a substitute", path, reason)

    @classmethod
    def decoding(cls, path: str, err: BaseException) -> BadImageError:
        """The error for `err`, raised by PIL decoding the image named `path`."""
        return cls.at(path, _reason(err))


def _reason(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):  # its text holds a file object repr, not the cause
        return "not an image PIL can identify (corrupt, or an unsupported format)"
    if isinstance(err, Image.DecompressionBombError):  # "Image size (N pixels) exceeds limit of M pixels, could be ..."
        return f"decompression bomb refused: {str(err).split(',')[0].lower()}"
    first = (str(err).splitlines() or [""])[0].rstrip(".")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class BadImages:
    """One run's policy and what it has reported in this process (each loader worker holds its own copy)."""

    def __init__(self, policy: str = "fail"):
        if policy not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
        self.policy = policy
        self.reported: set[str] = set()  # warn once per bad image, not once per epoch

    def read(self, attempt: Callable[[int], Row], index: int, count: int) -> tuple[Row, int]:
        """``(attempt(index), 0)``, or under skip ``(attempt(substitute), 1)`` when `index`'s image is bad.

        `count` is the number of samples the indices wrap around. Attempts run in order in the
        caller's RNG state, so a substitute draws what follows the bad image's draws.
        """
        try:
            return attempt(index), 0
        except BadImageError as err:
            if self.policy == "fail":
                raise
            # The error's text, not the error: a kept exception holds its traceback's frames (the callers'
            # locals, loaders included) in a reference cycle until the cyclic collector runs.
            message, path, reason = str(err), err.path, err.reason
        for step in range(1, min(count, MAX_BAD_RUN)):
            other = (index + step) % count
            try:
                row = attempt(other)
            except BadImageError:
                continue
            if message not in self.reported:
                self.reported.add(message)
                log.warning("skipping bad image %s (%s): sample %d replaced by sample %d", path, reason, index, other)
            return row, 1
        # Stop instead of decoding the whole dataset once per sample.
        raise BadImageError(f"{min(count, MAX_BAD_RUN)} images in a row from {path} cannot be decoded ({reason}); "
                            "check data.root and run `goyal-data validate ROOT`", path, reason)
