"""Keep freed CPU memory in the process, so that a CPU training step does not fault its memory in afresh.

A training update allocates and frees the same activations and gradients every time. glibc's
malloc serves blocks above its mmap threshold (128 kB, adapting up to 32 MB) with fresh mappings
and returns them to the kernel on free, and trims the top of the heap: each update then pays the
page faults and zero-filling of most of its memory again, about 9 % of a ResNet-18 update at 64 px
on a 2-core CPU. Raising both thresholds keeps that memory mapped for the next update. The cost
is that the process keeps its peak heap size until `release_freed_memory` or its exit; a training
process reaches that peak in its first update anyway, and releases it once training is over, before
the exports whose memory would otherwise come on top of it.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap; glibc ignores larger values (its limit is 32 MB on 64-bit).
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes a C int: the largest, i.e. never trim in practice
TOP_PAD_BYTES = 64 << 20  # grow the heap in steps of this size, fewer brk calls


def _glibc(name: str):
    """The C library's function `name`, or None off Linux or where the C library lacks it (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    Process-wide and idempotent; DataLoader workers forked afterwards inherit it. Returns whether
    it took effect: False where the C library has no glibc `mallopt` (macOS, Windows, musl),
    where nothing is changed.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (_M_TOP_PAD, TOP_PAD_BYTES))
    return all(mallopt(param, value) == 1 for param, value in settings)


def release_freed_memory() -> bool:
    """Return the freed memory `keep_freed_memory` kept to the kernel (glibc's `malloc_trim(0)`).

    Returns whether the call exists; False off glibc, where nothing was kept.
    """
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim(0)
    return True
