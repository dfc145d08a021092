"""Per-class pick-score thresholds: the ``pick_thresholds.csv`` table.

``cryocaps evaluate -o REPORT_DIR`` writes it (the best-F1 score threshold of each
class on a validation tomogram); ``cryocaps cluster-picks --thresholds`` reads it
back to pick other tomograms. Columns: :data:`THRESHOLD_COLUMNS`; ``min_score`` is
empty (NaN) for a class best kept whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.io.files import write_text_atomic
from cryocaps.io.layout import THRESHOLDS_NAME

THRESHOLD_COLUMNS = [
    "class_name",
    "min_score",
    "precision",
    "recall",
    "f1",
    "f1_keep_all",
    "n_picks",
]

__all__ = [
    "THRESHOLDS_NAME",
    "THRESHOLD_COLUMNS",
    "read_score_thresholds",
    "write_score_thresholds",
]


def write_score_thresholds(table: pd.DataFrame, folder: str | os.PathLike) -> Path:
    """Write ``table`` (:data:`THRESHOLD_COLUMNS`) as ``folder/pick_thresholds.csv``; returns
    the path.

    Replaces an existing file: callers check for it (``--overwrite``) before any work.
    """
    text = table[THRESHOLD_COLUMNS].to_csv(index=False, float_format="%.6g")
    return write_text_atomic(Path(folder) / THRESHOLDS_NAME, text)


def read_score_thresholds(path: str | os.PathLike, classes: ClassTable) -> dict[str, float]:
    """``{class_name: min_score}`` from a ``pick_thresholds.csv`` (classes kept whole are left
    out).
    """
    path = Path(path)
    if not path.is_file():
        raise CryocapsError(f"--thresholds {path}: no such file")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CryocapsError(f"--thresholds {path}: not a CSV table ({error})") from None
    missing = [c for c in ("class_name", "min_score") if c not in table.columns]
    if missing:
        raise CryocapsError(
            f"--thresholds {path}: no column {', '.join(missing)}; expected the {THRESHOLDS_NAME} "
            "that `cryocaps evaluate -o` writes"
        )
    thresholds = {}
    for name, value in zip(table["class_name"].astype(str), table["min_score"], strict=True):
        if name not in classes.names:
            raise CryocapsError(
                f"--thresholds {path}: class {name!r} is not in the class table "
                f"({', '.join(classes.names)})"
            )
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise CryocapsError(
                f"--thresholds {path}: min_score {value!r} of {name} is not a number"
            ) from None
        if np.isfinite(value):
            thresholds[name] = value
        elif not np.isnan(value):
            raise CryocapsError(f"--thresholds {path}: min_score {value} of {name} is not finite")
    return thresholds
