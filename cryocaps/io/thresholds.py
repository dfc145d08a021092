"""Per-class pick-score thresholds: the ``pick_thresholds.csv`` table.

``cryocaps evaluate -o REPORT_DIR`` writes it (the best-F1 score threshold of each
class on a validation tomogram); ``cryocaps cluster-picks --thresholds`` reads it
back to pick other tomograms. Columns: :data:`THRESHOLD_COLUMNS`; ``min_score`` is
empty (NaN) for a class best kept whole.

``cryocaps segment`` writes the thresholds a model was calibrated with during
training beside its maps (the *companion* file), with one more column,
``score``: what the threshold applies to, as cluster-picks scores a pick —
``probability`` (mean class probability, when ``<tomo>_probs``/``_score`` maps lie
beside the label map) or ``size_voxels`` (a label map alone) — one row per class
and kind. ``cluster-picks`` uses the rows of the kind its picks get.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.io.files import write_text_atomic
from cryocaps.io.layout import THRESHOLDS_NAME, companion_path

THRESHOLD_COLUMNS = [
    "class_name",
    "min_score",
    "precision",
    "recall",
    "f1",
    "f1_keep_all",
    "n_picks",
]

SCORE_COLUMN = "score"  # in a companion file: what min_score applies to
METHOD_COLUMN = "method"  # in a companion file: the picking method training chose per class
SCORE_KINDS = ("probability", "size_voxels")

__all__ = [
    "METHOD_COLUMN",
    "SCORE_COLUMN",
    "SCORE_KINDS",
    "THRESHOLDS_NAME",
    "THRESHOLD_COLUMNS",
    "companion_thresholds",
    "picking_score_kind",
    "read_thresholds_and_methods",
    "read_score_thresholds",
    "write_companion_thresholds",
    "write_score_thresholds",
]


def write_score_thresholds(table: pd.DataFrame, folder: str | os.PathLike) -> Path:
    """Write ``table`` (:data:`THRESHOLD_COLUMNS`) as ``folder/pick_thresholds.csv``; returns
    the path.

    Replaces an existing file: callers check for it (``--overwrite``) before any work.
    """
    text = table[THRESHOLD_COLUMNS].to_csv(index=False, float_format="%.6g")
    return write_text_atomic(Path(folder) / THRESHOLDS_NAME, text)


def write_companion_thresholds(
    kinds: dict[str, list[dict]], folder: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``folder/pick_thresholds.csv`` with a ``score`` column from ``{kind: records}``.

    Records hold :data:`THRESHOLD_COLUMNS` (``min_score`` None: keep all). An existing
    file with the same rows is kept; one with other rows is refused unless ``overwrite``.
    """
    with_method = any(METHOD_COLUMN in r for records in kinds.values() for r in records or [])
    columns = [*THRESHOLD_COLUMNS, *([METHOD_COLUMN] if with_method else [])]
    frames = [
        pd.DataFrame(records, columns=columns).assign(**{SCORE_COLUMN: kind})
        for kind, records in kinds.items()
        if kind in SCORE_KINDS and records
    ]
    table = pd.concat(frames, ignore_index=True)[[*columns, SCORE_COLUMN]]
    text = table.to_csv(index=False, float_format="%.6g")
    path = Path(folder) / THRESHOLDS_NAME
    if path.is_file() and not overwrite:
        try:
            same = path.read_text() == text
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            raise CryocapsError(
                f"{path} exists with other thresholds than the model's; pass --overwrite to "
                "replace it"
            )
        return path
    return write_text_atomic(path, text)


def picking_score_kind(label_paths, use_probabilities: bool) -> str | None:
    """What cluster-picks will score the picks of these label maps by (one of
    :data:`SCORE_KINDS`), or None when the maps differ (some with probability maps beside)."""
    kinds = {
        "probability"
        if use_probabilities and (companion_path(path, "probs") or companion_path(path, "score"))
        else "size_voxels"
        for path in label_paths
    }
    return kinds.pop() if len(kinds) == 1 else None


def companion_thresholds(label_paths) -> Path | None:
    """The ``pick_thresholds.csv`` segment wrote beside the label maps: one file for all of
    them, else None (none, or the maps lie in folders that do not share one)."""
    found = {
        (Path(path).parent / THRESHOLDS_NAME).resolve()
        if (Path(path).parent / THRESHOLDS_NAME).is_file()
        else None
        for path in label_paths
    }
    return found.pop() if len(found) == 1 else None


def read_score_thresholds(
    path: str | os.PathLike, classes: ClassTable, score_kind: str | None = None
) -> dict[str, float]:
    """``{class_name: min_score}`` from a ``pick_thresholds.csv`` (classes kept whole are left
    out).

    A companion file (with a ``score`` column) gives the rows of ``score_kind``.
    """
    path = Path(path)
    return _min_scores(path, _threshold_rows(path, classes, score_kind))


def read_thresholds_and_methods(
    path: str | os.PathLike, classes: ClassTable, score_kind: str | None, methods
) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`read_score_thresholds` and ``{class_name: method}``: the picking method training
    chose for each class on its held-out region, from the ``method`` column of a companion
    file (empty without that column). ``methods``: the method names allowed."""
    path = Path(path)
    table = _threshold_rows(path, classes, score_kind)
    chosen = {}
    if METHOD_COLUMN in table.columns:
        for name, method in zip(table["class_name"], table[METHOD_COLUMN], strict=True):
            if pd.isna(method):
                continue
            if str(method) not in methods:
                raise CryocapsError(
                    f"--thresholds {path}: method {method!r} of {name} is not one of "
                    f"{', '.join(methods)}"
                )
            chosen[name] = str(method)
    return _min_scores(path, table), chosen


def _threshold_rows(path: Path, classes: ClassTable, score_kind: str | None) -> pd.DataFrame:
    """The rows of a ``pick_thresholds.csv`` that apply (a companion file: those of
    ``score_kind``), checked: the columns there, every class in ``classes``."""
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
    if SCORE_COLUMN in table.columns:  # a companion file: the rows for these picks' scores
        if score_kind not in SCORE_KINDS:
            raise CryocapsError(
                f"--thresholds {path}: holds thresholds per kind of score, and these maps' picks "
                "are scored differently (some have probability or score maps beside them); "
                "pick them separately"
            )
        table = table[table[SCORE_COLUMN].astype(str) == score_kind]
    table = table.assign(class_name=table["class_name"].astype(str))
    for name in table["class_name"]:
        if name not in classes.names:
            raise CryocapsError(
                f"--thresholds {path}: class {name!r} is not in the class table "
                f"({', '.join(classes.names)})"
            )
    return table


def _min_scores(path: Path, table: pd.DataFrame) -> dict[str, float]:
    """``{class_name: min_score}`` of checked rows; classes kept whole (empty) left out."""
    thresholds = {}
    for name, value in zip(table["class_name"], table["min_score"], strict=True):
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
