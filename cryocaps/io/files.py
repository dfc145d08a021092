"""Atomic output files: write to a temporary name beside the target, rename on success."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryocaps.errors import CryocapsError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; killed writers' parts are left in place
    fcntl = None

log = logging.getLogger(__name__)


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing file unless ``overwrite``; create the parent folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CryocapsError(f"{path} exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise CryocapsError(f"{path} is a folder, expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it to ``path`` if the block succeeds.

    A crash or an exception inside the block removes the temporary file, so no
    half-written file ever appears under the final name. A process killed
    outright (SIGKILL, a node lost) cannot remove it; the temporary file stays
    locked while its writer lives, so the next write of ``path`` removes the
    parts no living process holds (:func:`remove_stale_parts`).
    """
    path = check_writable(path, overwrite)
    remove_stale_parts(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: the part looks stale
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        if fcntl is not None:
            os.close(fd)  # releases the lock, after the rename


def remove_stale_parts(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ``path`` that killed writers left behind; returns them.

    :func:`atomic_path` names them ``.<name>.<random>.part`` beside ``path`` and
    holds an exclusive lock on each while it writes; a part whose lock can be
    taken has no living writer. Where locks are not available nothing is removed.
    """
    path = Path(path)
    if fcntl is None:
        return []
    removed = []
    for part in path.parent.glob(f".{glob.escape(path.name)}.*.part"):
        if not part.is_file() or part.is_symlink():
            continue
        try:
            fd = os.open(part, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a living writer holds it (or the file system has no locks)
            continue
        else:
            part.unlink(missing_ok=True)
            removed.append(part)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d temporary file(s) of %s left by a killed run", len(removed), path)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write a small text file atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
