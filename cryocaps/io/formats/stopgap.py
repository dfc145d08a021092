"""STOPGAP motivelists (``data_stopgap_motivelist``).

1-based voxel positions: position = orig + shift, so voxel (0-based) = orig + shift - 1.
Tomograms by ``tomo_num``, classes by ``class``, angles ``phi, psi, the`` (ZXZ, see
:mod:`cryocaps.io.formats.angles`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cryocaps.errors import CryocapsError
from cryocaps.io.formats.angles import relion_to_stopgap, stopgap_to_relion
from cryocaps.io.formats.context import (
    XYZ,
    Geometry,
    canonical_frame,
    require_columns,
    table_angles,
    table_scores,
)
from cryocaps.io.formats.star import loop_blocks, read_star

BLOCK = "stopgap_motivelist"
ORIGINS = ["orig_x", "orig_y", "orig_z"]
SHIFTS = ["x_shift", "y_shift", "z_shift"]
ANGLES = ["phi", "psi", "the"]
COLUMNS = [
    "motl_idx",
    "tomo_num",
    "object",
    "subtomo_num",
    "halfset",
    *ORIGINS,
    "score",
    *SHIFTS,
    *ANGLES,
    "class",
]


def read_stopgap(path, geometry: Geometry) -> pd.DataFrame:
    blocks = loop_blocks(read_star(path))
    if BLOCK not in blocks:
        raise CryocapsError(f"{path}: no data_{BLOCK} block")
    motl = blocks[BLOCK].reset_index(drop=True)
    require_columns(motl, ["tomo_num", *ORIGINS], path, "STOPGAP motivelist")
    n = len(motl)
    try:
        numbers = motl["tomo_num"].to_numpy(dtype=float)
        origins = motl[ORIGINS].to_numpy(dtype=float)
        shifts = np.stack([_column(motl, c) for c in SHIFTS], axis=1)
        angles = np.stack([_column(motl, c) for c in ANGLES], axis=1)
    except (TypeError, ValueError):
        raise CryocapsError(
            f"{path}: non-numeric values in tomo_num, orig_*, *_shift or angles"
        ) from None
    if not (np.isfinite(numbers).all() and np.isfinite(origins).all()):
        raise CryocapsError(f"{path}: missing values in tomo_num or orig_x/y/z")
    names = geometry.names_for_numbers(numbers.astype(int), path, "tomo_num")
    tomos = pd.Series([names[int(k)] for k in numbers], dtype=object)
    positions = geometry.pixels_to_voxels(origins + shifts - 1.0, tomos, None, path)
    has_angles = any(c in motl.columns for c in ANGLES)
    classes = motl["class"] if "class" in motl else None
    scores = motl["score"].to_numpy(dtype=float) if "score" in motl else None
    return canonical_frame(
        tomos,
        geometry.class_names(classes, n, path),
        positions,
        scores,
        stopgap_to_relion(angles) if has_angles else None,
    )


def _column(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame:
        return np.zeros(len(frame))
    return np.nan_to_num(frame[column].to_numpy(dtype=float))


def write_stopgap(table: pd.DataFrame, path, geometry: Geometry, target=None) -> None:
    """A STOPGAP motivelist with all its standard columns; halfsets alternate A, B."""
    tomos = table["tomo"].astype(str)
    positions, _ = geometry.voxels_to_pixels(table[XYZ].to_numpy(dtype=float), tomos)
    positions = positions + 1.0  # 1-based
    origins = np.round(positions)
    shifts = positions - origins
    numbering = geometry.numbers_for_names(list(tomos))
    tomo_numbers = tomos.map(numbering).to_numpy(dtype=int)
    classes = geometry.class_numbers(table["class_name"], target or path)
    angles = relion_to_stopgap(table_angles(table))
    scores = table_scores(table)
    lines = ["", f"data_{BLOCK}", "", "loop_", *[f"_{c}" for c in COLUMNS]]
    for i in range(len(table)):
        index = i + 1
        lines.append(
            f"{index} {tomo_numbers[i]} {tomo_numbers[i]} {index} {'A' if index % 2 else 'B'} "
            + " ".join(str(int(v)) for v in origins[i])
            + f" {scores[i]:.6g} "
            + " ".join(f"{v:.6f}" for v in shifts[i])
            + " "
            + " ".join(f"{v:.6f}" for v in angles[i])
            + f" {classes[i]}"
        )
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n\n")
