"""Process-wide memory policy, chosen once by a command (glibc malloc on Linux).

Training and segmentation want opposite things from glibc's malloc:

- Training allocates the same large tensors every step (3D-UCaps vote tensors
  are 30-130 MB). By default glibc maps each block above its mmap threshold
  afresh and unmaps it when freed, so every step page-faults them in again;
  measured on the capsule layers, that doubles or triples the cost of an
  element-wise pass. :func:`keep_freed_blocks` serves everything from the heap
  and never trims it: peak memory is unchanged, but the process keeps it until
  it exits.
- Segmentation allocates per-window tensors of changing sizes; once glibc has
  raised its threshold they come from the heap and fragment it, so peak RSS
  creeps up with the number of windows (measured: +34 MB over six passes of 9
  windows, flat with the policy). :func:`return_freed_blocks` maps every block
  above a small fixed threshold, so freeing it returns the memory.

Each call replaces the previous policy (the last one wins), so tests and
notebooks that train and then segment in one process stay correct. Both are
no-ops returning False where ``mallopt`` is missing (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024
GLIBC_DEFAULT_MMAP_MAX = 65536

_policy: str | None = None  # the policy applied last (None: glibc's defaults)


def _mallopt(settings: list[tuple[int, int]]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(bool(mallopt(parameter, value)) for parameter, value in settings)


def _apply(name: str, settings: list[tuple[int, int]]) -> bool:
    global _policy
    done = _mallopt(settings)
    if done:
        _policy = name
    return done


def keep_freed_blocks() -> bool:
    """Keep freed memory mapped for reuse (training); True if applied."""
    return _apply("keep", [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)])


def return_freed_blocks(threshold_bytes: int = 256 * 1024) -> bool:
    """Hand blocks above ``threshold_bytes`` back to the system when freed (segmentation); True if applied."""
    return _apply(
        "return",
        [
            (M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX),
            (M_TRIM_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD),
            (M_MMAP_THRESHOLD, int(threshold_bytes)),
        ],
    )


def current_policy() -> str | None:
    """``"keep"``, ``"return"`` or None (glibc's defaults), for run.json."""
    return _policy
