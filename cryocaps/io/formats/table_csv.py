"""CSV: the canonical table itself, with a header (positions in voxels, 0-based)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cryocaps.errors import CryocapsError
from cryocaps.io.formats.context import ANGLE_COLUMNS, CANONICAL_COLUMNS, Geometry, canonical_frame


def read_csv(path, geometry: Geometry) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"tomo": str, "class_name": str})
    except pd.errors.EmptyDataError:
        raise CryocapsError(f"{path}: empty CSV file") from None
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad file
        raise CryocapsError(f"{path}: not a readable CSV file ({error})") from error
    missing = [c for c in ("tomo", "x", "y", "z") if c not in frame.columns]
    if missing:
        raise CryocapsError(
            f"{path}: not a particle CSV: missing column(s) {', '.join(missing)} "
            "(needs tomo,class_name,x,y,z,score)"
        )
    try:
        positions = frame[["x", "y", "z"]].to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise CryocapsError(f"{path}: non-numeric values in x, y, z") from None
    if not np.isfinite(positions).all():
        raise CryocapsError(f"{path}: missing values in x, y, z")
    classes = frame["class_name"] if "class_name" in frame else None
    if classes is not None and classes.isna().any():
        raise CryocapsError(f"{path}: missing values in class_name")
    angles = None
    if any(c in frame.columns for c in ANGLE_COLUMNS):
        angles = np.stack(
            [
                np.nan_to_num(frame[c].to_numpy(dtype=float))
                if c in frame
                else np.zeros(len(frame))
                for c in ANGLE_COLUMNS
            ],
            axis=1,
        )
    return canonical_frame(
        frame["tomo"].astype(str),
        geometry.class_names(classes, len(frame), path),
        positions,
        frame["score"].to_numpy(dtype=float) if "score" in frame else None,
        angles,
    )


def write_csv(table: pd.DataFrame, path, geometry: Geometry, target=None) -> None:
    columns = CANONICAL_COLUMNS + [c for c in ANGLE_COLUMNS if c in table.columns]
    table[columns].to_csv(path, index=False, float_format="%.6f")
