"""Particle lists: the canonical table and RELION 3/4/5, STOPGAP, Dynamo and CSV files.

Canonical table (pandas DataFrame), one row per particle:

    tomo        tomogram name (matches the MRC file stem)
    class_name  class name (or class number as text when no class table is given)
    x, y, z     position in voxels of the named tomogram, 0-based, voxel centre = integer
    score       confidence (NaN when unknown)
    rot, tilt, psi  optional, degrees, RELION ZYZ convention

(STUB: only CSV is implemented so far; the other formats are being written.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.errors import CryocapsError

CANONICAL_COLUMNS = ["tomo", "class_name", "x", "y", "z", "score"]
ANGLE_COLUMNS = ["rot", "tilt", "psi"]
FORMATS = ("relion5", "relion4", "relion3", "stopgap", "dynamo", "csv")


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=float if c in "xyzscore" else str) for c in CANONICAL_COLUMNS})


def read_particles(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    tomograms=None,
    classes=None,
    coords_pixel_size_angstrom: float | None = None,
) -> pd.DataFrame:
    """Read one or more particle files into the canonical table."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CryocapsError(f"{path}: no such particle file")
        frame = pd.read_csv(path, dtype={"tomo": str, "class_name": str})
        missing = [c for c in ("tomo", "x", "y", "z") if c not in frame.columns]
        if missing:
            raise CryocapsError(f"{path}: missing column(s) {', '.join(missing)}")
        if "class_name" not in frame:
            frame["class_name"] = "1"
        if "score" not in frame:
            frame["score"] = np.nan
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def write_particles(table: pd.DataFrame, path, *, format: str | None = None, overwrite: bool = False, **_):
    from cryocaps.io.files import atomic_path

    with atomic_path(path, overwrite=overwrite) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)
