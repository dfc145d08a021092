"""Memory-mapped volumes read or written slab by slab without their pages piling up.

Reading or writing a memory map touches pages that then count in the process's
resident memory until the map is closed. A stage that walks a large volume slab
by slab calls :func:`release_pages` after each slab, so its peak memory does not
grow with the file.
"""

from __future__ import annotations

import contextlib
import mmap


def _backing_mmap(array) -> mmap.mmap | None:
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        if getattr(base, "mode", None) == "c":  # a private copy-on-write map: dropping loses edits
            return None
        base = getattr(base, "base", None)
    return base


def release_pages(array, flush: bool = False) -> None:
    """Drop the resident pages of a memory-mapped array from this process.

    Pages of a file mapping count in the process's resident memory until it
    is unmapped; dropping them after each slab keeps the peak independent of
    the file size. The data stay in the file (and the page cache). Writable
    maps are flushed first when ``flush``. A no-op for anything that is not a
    memory map (ordinary arrays, lazily read chunked arrays).
    """
    mapping = _backing_mmap(array)
    if mapping is None or mapping.closed or not hasattr(mapping, "madvise"):
        return
    with contextlib.suppress(OSError, ValueError):
        if flush:
            mapping.flush()
        mapping.madvise(mmap.MADV_DONTNEED)
