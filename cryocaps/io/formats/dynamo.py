"""Dynamo tables (``.tbl``): one particle per line, whitespace-separated numbers.

Columns used (1-based as in Dynamo's documentation): 1 tag, 4-6 shifts dx dy dz,
7-9 tdrot tilt narot (ZXZ, see :mod:`cryocaps.io.formats.angles`), 10 cc (score),
20 tomo, 22 class, 24-26 x y z (1-based voxels): voxel = x + dx - 1.
Tables with only 26 columns, MATLAB complex tokens (``0+1.2e-06i``, real part
kept) and positions ending in .5 are read as they are.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cryocaps.errors import CryocapsError
from cryocaps.io.formats.angles import dynamo_to_relion, relion_to_dynamo
from cryocaps.io.formats.context import XYZ, Geometry, canonical_frame, table_angles, table_scores

log = logging.getLogger(__name__)

MIN_COLUMNS = 26
N_COLUMNS = 35
# 0-based column indices
TAG, SHIFTS, ANGLES, SCORE, TOMO, CLASS, POSITION = 0, [3, 4, 5], [6, 7, 8], 9, 19, 21, [23, 24, 25]


def parse_number(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        return complex(token.replace("i", "j")).real  # MATLAB writes complex values as a+bi


def read_table(path) -> np.ndarray:
    """The numbers of a .tbl as an (N, columns) float array."""
    rows = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, 1):
            tokens = line.split()
            if not tokens:
                continue
            try:
                rows.append([parse_number(t) for t in tokens])
            except ValueError:
                raise CryocapsError(
                    f"{path}: line {line_number} is not a row of numbers; not a Dynamo table"
                ) from None
    if not rows:
        log.warning("%s: empty Dynamo table (no particles)", path)
        return np.zeros((0, N_COLUMNS))
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise CryocapsError(f"{path}: rows have different numbers of columns ({sorted(widths)})")
    width = widths.pop()
    if width < MIN_COLUMNS:
        raise CryocapsError(
            f"{path}: {width} columns; a Dynamo table needs at least {MIN_COLUMNS} "
            "(tomogram in 20, class in 22, x y z in 24-26)"
        )
    return np.asarray(rows, dtype=float)


def read_dynamo(path, geometry: Geometry) -> pd.DataFrame:
    table = read_table(path)
    if not np.isfinite(table[:, POSITION + SHIFTS + [TOMO]]).all():
        raise CryocapsError(f"{path}: non-finite values in columns 4-6, 20 or 24-26")
    names = geometry.names_for_numbers(table[:, TOMO].astype(int), path, "tomogram (column 20)")
    tomos = pd.Series([names[int(k)] for k in table[:, TOMO]], dtype=object)
    positions = geometry.pixels_to_voxels(
        table[:, POSITION] + table[:, SHIFTS] - 1.0, tomos, None, path
    )
    classes = pd.Series(table[:, CLASS])
    return canonical_frame(
        tomos,
        geometry.class_names(classes, len(table), path),
        positions,
        table[:, SCORE],
        dynamo_to_relion(table[:, ANGLES]),
    )


def write_dynamo(table: pd.DataFrame, path, geometry: Geometry, target=None) -> None:
    """A 35-column Dynamo table; positions split into integer x,y,z and fractional shifts."""
    tomos = table["tomo"].astype(str)
    positions, _ = geometry.voxels_to_pixels(table[XYZ].to_numpy(dtype=float), tomos)
    positions = positions + 1.0
    whole = np.round(positions)
    rows = np.zeros((len(table), N_COLUMNS))
    rows[:, TAG] = np.arange(1, len(table) + 1)
    rows[:, 1] = 1  # aligned
    rows[:, 2] = 1  # averaged
    rows[:, SHIFTS] = positions - whole
    rows[:, ANGLES] = relion_to_dynamo(table_angles(table))
    rows[:, SCORE] = table_scores(table)
    rows[:, TOMO] = tomos.map(geometry.numbers_for_names(list(tomos))).to_numpy(dtype=float)
    rows[:, CLASS] = geometry.class_numbers(table["class_name"], target or path)
    rows[:, POSITION] = whole
    integer_columns = {0, 1, 2, TOMO, CLASS, *POSITION}
    with open(path, "w") as handle:
        for row in rows:
            handle.write(
                " ".join(
                    str(int(v)) if i in integer_columns else f"{v:.6g}" for i, v in enumerate(row)
                )
                + "\n"
            )
