"""Evaluation from files to files: read picks and truth, write the report folder.

``evaluate -o REPORT_DIR`` writes report.json (scores, AUPRC, confusions, per
tomogram), confusion.csv, pr_curve.png, matches.csv (every pick and missed
particle with its outcome), pick_thresholds.csv (best-F1 score threshold per
class) and overlay_<tomo>.png; with label maps, voxel_report.json.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.evaluation.particles import (
    Matching,
    _few,
    best_score_thresholds,
    confusion_table,
    fbeta_score,
    match_picks,
    pick_precision_recall,
    summarize,
)
from cryocaps.evaluation.voxels import evaluate_label_files, label_map_files
from cryocaps.io.layout import THRESHOLDS_NAME

log = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "confusion.csv", "pr_curve.png", "matches.csv", THRESHOLDS_NAME)
VOXEL_REPORT_NAME = "voxel_report.json"


@dataclass
class ParticleReport:
    """What :func:`write_report` wrote: every file, and the score thresholds it tuned.

    thresholds : per-class best-F1 score thresholds (columns
        :data:`cryocaps.io.thresholds.THRESHOLD_COLUMNS`), as in ``thresholds_path``
    """

    files: list[Path]
    thresholds: pd.DataFrame
    thresholds_path: Path

    def tuned_macro_f1(self) -> float | None:
        """Mean F1 over scored classes with the tuned thresholds; None when none was tuned."""
        tuned = self.thresholds.dropna(subset=["f1"])
        if tuned.empty or not tuned["min_score"].notna().any():
            return None
        return float(tuned["f1"].mean())


@dataclass
class VoxelReport:
    """Voxel scores (:meth:`VoxelScores.result`), tomograms scored, files read and written."""

    scores: dict
    tomograms: list[str]
    inputs: list[Path]
    files: list[Path]


def read_pick_file(path: str | os.PathLike, **read_options) -> pd.DataFrame:
    """Read a particle file; an empty file (0 bytes or no rows) is an empty table, with a
    warning."""
    from cryocaps.io.particles import empty_table, read_particles

    path = Path(path)
    if path.is_file() and not path.read_bytes()[:4096].strip():
        log.warning("%s is empty: no picks, so every particle counts as missed (F1 = 0)", path)
        return empty_table()
    table = read_particles(path, **read_options)
    if table.empty:
        log.warning("%s holds no particles: every particle counts as missed (F1 = 0)", path)
    return table


def evaluate_files(
    picks_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    classes: ClassTable,
    *,
    voxel_size_angstrom: float | None = None,
    tomograms=None,
    tolerance_fraction: float = 0.5,
    beta: float = 1.0,
    coords_pixel_size_angstrom: float | None = None,
    copick=None,
) -> tuple[dict, Matching]:
    """Read a pick file and a truth file (any format) and score them (see :func:`evaluate_picks`).

    ``copick`` (a ``CopickSelection``) selects the picks of a copick config.json given
    as either file.

    The voxel size that turns class radii into voxels is ``voxel_size_angstrom`` when
    given, else each tomogram's own from ``tomograms`` (list of TomogramInfo). Given
    ``tomograms``, only those tomograms are scored. Returns (scores dict, :class:`Matching`).
    """
    for path in (picks_path, truth_path):
        if not Path(path).exists():
            raise CryocapsError(f"{path}: no such particle file")
    if voxel_size_angstrom is None and not tomograms:
        raise CryocapsError(
            "need the voxel size to turn class radii (Å) into voxels: give --voxel-size-angstrom "
            "or the tomograms with --tomograms"
        )
    options = {
        "tomograms": tomograms,
        "classes": classes,
        "coords_pixel_size_angstrom": coords_pixel_size_angstrom,
        "copick": copick,
    }
    picks = read_pick_file(picks_path, **options)
    truth = _read_truth_file(truth_path, options)
    voxel_sizes = (
        voxel_size_angstrom
        if voxel_size_angstrom is not None
        else {info.name: info.voxel_size_angstrom for info in tomograms}
    )
    try:
        names = [info.name for info in tomograms] if tomograms else None
        matching = match_picks(
            picks, truth, classes, voxel_sizes, tolerance_fraction, tomograms=names
        )
    except CryocapsError as error:
        raise CryocapsError(f"{picks_path} vs {truth_path}: {error}") from None
    return summarize(matching, beta), matching


def _read_truth_file(path, options: dict) -> pd.DataFrame:
    """Read the true particles; an empty table is scored, with a warning."""
    from cryocaps.io.particles import read_particles

    table = read_particles(path, **options)
    if table.empty:
        log.warning("%s holds no true particles: every pick counts as a false positive", path)
    return table


def overlay_panels(
    volume: np.ndarray,
    matching: Matching,
    tomo: str,
    voxel_size_angstrom: float,
    n_slices: int = 3,
) -> list[tuple[np.ndarray, list, str]]:
    """Slabs of a tomogram with its picks and particles as circles, for :func:`plots.plot_overlay`.

    The slabs are centred on the quartiles of the particles' z (spread over the
    tomogram when it has none) and average a few slices (half the smallest class
    radius each side). A particle is drawn on a slab when its sphere cuts the
    slab's centre plane, with the radius of that cross-section: picks as true or
    false positives, missed particles as false negatives.
    """
    from cryocaps.plots import Circle

    picks = matching.picks[matching.picks["tomo"] == tomo]
    truth = matching.truth[matching.truth["tomo"] == tomo]
    radii = {c.name: c.radius_voxels(voxel_size_angstrom) for c in matching.classes}
    depth = volume.shape[0]
    reference = truth if len(truth) else picks
    quantiles = np.arange(1, n_slices + 1) / (n_slices + 1)
    if len(reference):
        centres = np.quantile(reference["z"].to_numpy(), quantiles)
    else:
        centres = quantiles * depth
    half = max(1, int(round(min(radii.values()) / 2)))
    show_class = len(matching.classes) > 1
    panels = []
    for z in sorted({int(np.clip(round(c), 0, depth - 1)) for c in centres}):
        low, high = max(0, z - half), min(depth, z + half + 1)
        image = np.asarray(volume[low:high], dtype=np.float32).mean(axis=0)
        circles = []
        for frame in (
            picks,
            truth[truth["status"] == "fn"],
        ):  # status: tp/fp for picks, fn for misses
            for row in frame.itertuples(index=False):
                radius = radii[row.class_name]
                dz = abs(row.z - z)
                if dz >= radius:
                    continue
                section = max(1.5, float(np.sqrt(radius**2 - dz**2)))
                circles.append(
                    Circle(row.x, row.y, section, row.status, row.class_name if show_class else "")
                )
        counts = {k: sum(c.outcome == k for c in circles) for k in ("tp", "fp", "fn")}
        title = (
            f"z = {z} (mean of z {low}-{high - 1}): "
            f"{counts['tp']} TP, {counts['fp']} FP, {counts['fn']} FN"
        )
        panels.append((image, circles, title))
    return panels


def write_report(
    report_dir: str | os.PathLike,
    scores: dict,
    matching: Matching,
    *,
    parameters: dict | None = None,
    overlays: Sequence[str | os.PathLike] = (),
    overlay_voxel_size_angstrom: float | None = None,
    n_slices: int = 3,
    overwrite: bool = False,
) -> ParticleReport:
    """Write the report folder (see module docstring) for ``scores`` and their ``matching``.

    ``overlays`` are tomogram MRC files whose picks are drawn (``overlay_<name>.png``).
    Existing files are refused unless ``overwrite``, before anything is written.
    Returns the files written and the score thresholds tuned here.
    """
    from cryocaps.io.files import check_writable, write_text_atomic
    from cryocaps.io.layout import tomogram_name
    from cryocaps.io.thresholds import write_score_thresholds
    from cryocaps.plots import plot_precision_recall

    report_dir = Path(report_dir)
    overlay_names = [f"overlay_{tomogram_name(p)}.png" for p in overlays]
    for name in (*REPORT_FILES, *overlay_names):
        check_writable(report_dir / name, overwrite)
    scored = set(matching.truth["tomo"]) | set(matching.picks["tomo"])
    for path in overlays:
        if tomogram_name(path) not in scored:
            raise CryocapsError(
                f"--overlay {path}: tomogram {tomogram_name(path)!r} has no scored picks or "
                f"particles (tomograms: {_few(scored)})"
            )
    curves = pick_precision_recall(matching)
    confusion = confusion_table(matching)
    report = {
        **scores,
        "auprc": {name: curve["auprc"] for name, curve in curves.items()},
        "confusion": {
            row: {col: int(v) for col, v in values.items()} for row, values in confusion.iterrows()
        },
        "per_tomogram": _per_tomogram(matching),
        "parameters": parameters or {},
    }
    thresholds = best_score_thresholds(matching, curves)
    written = [
        write_text_atomic(report_dir / "report.json", json.dumps(report, indent=2) + "\n"),
        write_text_atomic(report_dir / "confusion.csv", confusion.to_csv()),
        plot_precision_recall(curves, report_dir / "pr_curve.png"),
        write_text_atomic(report_dir / "matches.csv", _matches_csv(matching)),
        write_score_thresholds(thresholds, report_dir),
    ]
    written += _write_overlays(
        report_dir, matching, overlays, overlay_names, overlay_voxel_size_angstrom, n_slices
    )
    return ParticleReport(written, thresholds, report_dir / THRESHOLDS_NAME)


def _write_overlays(
    report_dir: Path,
    matching: Matching,
    overlays: Sequence[str | os.PathLike],
    names: Sequence[str],
    voxel_size_angstrom: float | None,
    n_slices: int,
) -> list[Path]:
    """One PNG of :func:`overlay_panels` per tomogram in ``overlays``, named ``names``."""
    from cryocaps.io.layout import tomogram_name
    from cryocaps.io.volumes import read_tomogram
    from cryocaps.plots import plot_overlay

    written = []
    for path, name in zip(overlays, names, strict=True):
        tomogram = read_tomogram(path, mmap=True, voxel_size_angstrom=voxel_size_angstrom)
        tomo = tomogram_name(path)
        try:
            panels = overlay_panels(
                tomogram.data, matching, tomo, tomogram.voxel_size_angstrom, n_slices
            )
        finally:
            tomogram.close()
        title = f"{tomo}: picks against truth (tolerance {matching.tolerance_fraction:g} × radius)"
        written.append(plot_overlay(panels, report_dir / name, title=title))
    return written


def voxel_report(
    labels_pred: Sequence[str | os.PathLike],
    labels_true: Sequence[str | os.PathLike],
    classes: ClassTable,
    *,
    report_dir: str | os.PathLike | None = None,
    parameters: dict | None = None,
    overwrite: bool = False,
    ignored_labels: Collection[int] = (),
) -> VoxelReport:
    """Voxel scores of label maps (files or folders), and ``report_dir/voxel_report.json``.

    See :func:`label_map_files` and :func:`evaluate_label_files` (``ignored_labels``:
    labels of classes left out on purpose). An existing report is refused unless
    ``overwrite``, before any map is read.
    """
    from cryocaps.io.files import check_writable, write_text_atomic

    predicted, true = label_map_files(labels_pred, labels_true)
    if report_dir is not None:
        check_writable(Path(report_dir) / VOXEL_REPORT_NAME, overwrite)
    scores, names = evaluate_label_files(predicted, true, classes, ignored_labels=ignored_labels)
    written = []
    if report_dir is not None:
        content = {**scores, "tomograms": names, "parameters": parameters or {}}
        written.append(
            write_text_atomic(
                Path(report_dir) / VOXEL_REPORT_NAME, json.dumps(content, indent=2) + "\n"
            )
        )
    return VoxelReport(scores, names, [*predicted, *true], written)


def _per_tomogram(matching: Matching) -> dict:
    result = {}
    for tomo in sorted(set(matching.truth["tomo"]) | set(matching.picks["tomo"])):
        picks = matching.picks[matching.picks["tomo"] == tomo]
        truth = matching.truth[matching.truth["tomo"] == tomo]
        tp = int((picks["status"] == "tp").sum())
        fp = len(picks) - tp
        fn = int((truth["status"] == "fn").sum())
        result[tomo] = {"tp": tp, "fp": fp, "fn": fn, "f1": fbeta_score(tp, fp, fn)}
    return result


def _matches_csv(matching: Matching) -> str:
    """Every pick and every missed particle, one row each, with its outcome."""
    columns = ["tomo", "class_name", "x", "y", "z", "score"]
    picks = matching.picks[columns].assign(
        source="pick",
        outcome=matching.picks["status"],
        distance=matching.picks["distance"],
        duplicate=matching.picks["duplicate"],
        confused_with=matching.picks["confused_with"],
    )
    missed = matching.truth[matching.truth["status"] == "fn"][columns].assign(
        source="truth", outcome="fn", distance=np.nan, duplicate=False, confused_with=""
    )
    return pd.concat([picks, missed], ignore_index=True).to_csv(index=False, float_format="%.3f")
