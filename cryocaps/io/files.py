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
    """Refuse to replace an existing file unless ``overwrite``, and a path that cannot be a
    file. Creates nothing: the writer (:func:`atomic_path`) makes the folder when it writes,
    so a run refused later leaves no empty folder behind."""
    path = Path(path)
    if path.is_dir():
        raise CryocapsError(f"{path} is a folder, expected a file name")
    blocking = _file_in_the_way(path.parent)
    if blocking is not None:
        raise CryocapsError(f"{path}: {blocking} is a file, not a folder")
    if path.exists() and not overwrite:
        raise CryocapsError(f"{path} exists; pass --overwrite to replace it")
    return path


def check_folder(folder: str | os.PathLike, flag: str | None = None) -> Path:
    """Refuse an output folder that is a file or lies under one (nothing is created)."""
    folder = Path(folder)
    blocking = _file_in_the_way(folder)
    if blocking is not None:
        where = f"{flag} {folder}" if flag else str(folder)
        if blocking == folder:
            raise CryocapsError(f"{where}: is a file, expected a folder")
        raise CryocapsError(f"{where}: {blocking} is a file, not a folder")
    return folder


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing path among ``folder`` and its parents, if it is not a folder."""
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    return existing if existing is not None and not existing.is_dir() else None


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and its parents; a CryocapsError when a file stands in the way."""
    folder = check_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
    make_folder(path.parent)
    remove_stale_parts(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as error:  # the error would name the temporary file, not the one asked for
        raise OSError(error.errno, error.strerror, str(path)) from None
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: the part looks stale
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if error.filename is None or os.fsdecode(error.filename) == tmp_name:
            # a failed write (disk full, quota) names no file: name the one being written
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
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
