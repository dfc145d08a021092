"""Score picks against ground truth: particle matching, P/R/F1/F-beta, confusions, AUPRC.

Particle level
    picks and true particles are matched one to one, per tomogram and class, by the
    Hungarian algorithm on their distances; a pair counts only within the tolerance
    ``tolerance_fraction x class radius`` (voxels of that tomogram). Matched picks are
    true positives, other picks false positives, unmatched particles false negatives.
    A false positive within tolerance of an already matched particle of its own class
    is a *duplicate*; one within tolerance of a particle of another class is a *class
    confusion*.
Voxel level
    Dice/F1 per class between two label maps and, given probabilities, the area under
    the voxel precision-recall curve next to its chance level (the positive fraction).

Conventions: a class with neither picks nor particles has no scores (None) and is left
out of the macro mean; precision is 0 when a class has no picks, recall 0 when it has
no particles. F-beta = (1 + b²) TP / ((1 + b²) TP + b² FN + FP).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable
from cryocaps.errors import CryocapsError

log = logging.getLogger(__name__)

BACKGROUND = "background"
MISSED = "missed"


@dataclass
class Matching:
    """Per-particle outcome of matching picks to truth.

    picks : the picks with ``status`` ("tp"/"fp"), ``truth_index`` (row of ``truth``
        or -1), ``distance`` (voxels, NaN if unmatched), ``duplicate`` (bool) and
        ``confused_with`` (class name of another class's particle it sits on, or "")
    truth : the particles with ``status`` ("tp"/"fn") and ``pick_index``
    tolerance_voxels : {(tomo, class_name): tolerance in voxels}
    """

    picks: pd.DataFrame
    truth: pd.DataFrame
    classes: ClassTable
    tolerance_fraction: float
    tolerance_voxels: dict


def voxel_size_of(voxel_size_angstrom: float | Mapping[str, float], tomo: str) -> float:
    if isinstance(voxel_size_angstrom, Mapping):
        if tomo not in voxel_size_angstrom:
            raise CryocapsError(f"no voxel size for tomogram {tomo!r}; give its MRC file or --voxel-size-angstrom")
        value = float(voxel_size_angstrom[tomo])
    else:
        value = float(voxel_size_angstrom)
    if not value > 0:
        raise CryocapsError(f"voxel size must be > 0 Å, got {value} (tomogram {tomo!r})")
    return value


def _canonical(table: pd.DataFrame, classes: ClassTable, what: str) -> pd.DataFrame:
    missing = [c for c in ("tomo", "class_name", "x", "y", "z") if c not in table.columns]
    if missing:
        raise CryocapsError(f"{what}: missing column(s) {', '.join(missing)}")
    table = table.reset_index(drop=True).copy()
    names = {}
    for value in table["class_name"].astype(str).unique():
        try:
            names[value] = classes.name_of(value)
        except CryocapsError:
            raise CryocapsError(
                f"{what}: class {value!r} is not in the class table {classes.source} "
                f"(classes: {', '.join(classes.names)})"
            ) from None
    table["class_name"] = table["class_name"].astype(str).map(names)
    table["tomo"] = table["tomo"].astype(str)
    if "score" not in table:
        table["score"] = np.nan
    for column in ("x", "y", "z", "score"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    if table[["x", "y", "z"]].isna().any().any():
        raise CryocapsError(f"{what}: some positions are not numbers")
    return table


def match_picks(
    picks: pd.DataFrame,
    truth: pd.DataFrame,
    classes: ClassTable,
    voxel_size_angstrom: float | Mapping[str, float],
    tolerance_fraction: float = 0.5,
    *,
    tomograms: Collection[str] | None = None,
) -> Matching:
    """Match picks to true particles one to one (see module docstring).

    Parameters
    ----------
    picks, truth : particle tables (canonical columns; positions in voxels)
    classes : class table; class values are mapped with ``ClassTable.name_of``
    voxel_size_angstrom : one voxel size for all tomograms, or {tomo: voxel size}, Å
    tolerance_fraction : match distance limit as a fraction of the class radius
    tomograms : score only these tomograms (None: every tomogram of ``truth``)

    Only tomograms present in ``truth`` are scored; picks in other tomograms are
    dropped with a warning, and the particles of a truth tomogram without picks
    all count as missed (with a warning). Raises CryocapsError when picks and
    truth (both non-empty) share no tomogram.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    if not tolerance_fraction > 0:
        raise CryocapsError(f"--tolerance-fraction must be > 0, got {tolerance_fraction}")
    picks = _canonical(picks, classes, "picks")
    truth = _canonical(truth, classes, "truth")
    if tomograms is not None:
        chosen = set(map(str, tomograms))
        if not chosen & (set(truth["tomo"]) | set(picks["tomo"])):
            raise CryocapsError(
                f"none of the tomograms {_few(chosen)} has picks or true particles "
                f"(truth names {_few(set(truth['tomo']))})"
            )
        picks = picks[picks["tomo"].isin(chosen)].reset_index(drop=True)
        truth = truth[truth["tomo"].isin(chosen)].reset_index(drop=True)
    truth_tomos = set(truth["tomo"])
    pick_tomos = set(picks["tomo"])
    if len(picks) and len(truth) and not truth_tomos & pick_tomos:
        raise CryocapsError(
            "picks and truth have no tomogram in common: picks name "
            f"{_few(pick_tomos)}, truth names {_few(truth_tomos)}"
        )
    outside = pick_tomos - truth_tomos
    if outside and len(truth):
        log.warning("ignoring picks in %d tomogram(s) without truth: %s", len(outside), _few(outside))
        picks = picks[picks["tomo"].isin(truth_tomos)].reset_index(drop=True)
    unpicked = truth_tomos - pick_tomos
    if unpicked and len(picks):
        log.warning(
            "no picks in %d tomogram(s) of the truth (%s): their particles count as missed",
            len(unpicked), _few(unpicked),
        )

    pick_truth = np.full(len(picks), -1, dtype=np.int64)
    pick_distance = np.full(len(picks), np.nan)
    tolerance_voxels = {}
    xyz = ["x", "y", "z"]
    pick_groups = picks.groupby(["tomo", "class_name"]).indices
    truth_groups = truth.groupby(["tomo", "class_name"]).indices
    for key in sorted(set(pick_groups) | set(truth_groups)):
        tomo, name = key
        tolerance = tolerance_fraction * classes.by_name(name).radius_voxels(
            voxel_size_of(voxel_size_angstrom, tomo)
        )
        tolerance_voxels[key] = tolerance
        pick_rows = pick_groups.get(key, np.array([], dtype=int))
        truth_rows = truth_groups.get(key, np.array([], dtype=int))
        if len(pick_rows) == 0 or len(truth_rows) == 0:
            continue
        pick_xyz = picks.loc[pick_rows, xyz].to_numpy()
        truth_xyz = truth.loc[truth_rows, xyz].to_numpy()
        pairs = cKDTree(pick_xyz).sparse_distance_matrix(cKDTree(truth_xyz), tolerance, output_type="ndarray")
        if len(pairs) == 0:
            continue
        n_picks, n_truth = len(pick_rows), len(truth_rows)
        # Independent groups of nearby picks and particles are matched separately: the
        # assignment problems stay tiny however many particles a tomogram holds.
        graph = coo_matrix(
            (np.ones(len(pairs)), (pairs["i"], n_picks + pairs["j"])), shape=(n_picks + n_truth,) * 2
        )
        _, group = connected_components(graph, directed=False)
        pair_group = group[pairs["i"]]
        for g in np.unique(pair_group):
            members = pairs[pair_group == g]
            p_ids, p_local = np.unique(members["i"], return_inverse=True)
            t_ids, t_local = np.unique(members["j"], return_inverse=True)
            # Pairs beyond tolerance cost more than any set of real matches: the assignment
            # first maximises the number of matches, then minimises their total distance.
            cost = np.full((len(p_ids), len(t_ids)), 1e6 * (1 + tolerance))
            cost[p_local, t_local] = members["v"]
            rows, cols = linear_sum_assignment(cost)
            good = cost[rows, cols] <= tolerance
            pick_truth[pick_rows[p_ids[rows[good]]]] = truth_rows[t_ids[cols[good]]]
            pick_distance[pick_rows[p_ids[rows[good]]]] = cost[rows[good], cols[good]]
    matched = pick_truth >= 0
    truth_pick = np.full(len(truth), -1, dtype=np.int64)
    truth_pick[pick_truth[matched]] = np.nonzero(matched)[0]
    picks["status"] = np.where(matched, "tp", "fp")
    picks["truth_index"] = pick_truth
    picks["distance"] = pick_distance
    picks["duplicate"] = False
    picks["confused_with"] = ""
    truth["status"] = np.where(truth_pick >= 0, "tp", "fn")
    truth["pick_index"] = truth_pick
    _label_false_positives(picks, truth, classes, voxel_size_angstrom, tolerance_fraction)
    return Matching(picks, truth, classes, tolerance_fraction, tolerance_voxels)


def _label_false_positives(picks, truth, classes, voxel_size_angstrom, tolerance_fraction) -> None:
    """Mark false positives that sit on a particle: its own class (duplicate) or another."""
    from scipy.spatial import cKDTree

    xyz = ["x", "y", "z"]
    false = picks.index[picks["status"] == "fp"]
    if len(false) == 0 or len(truth) == 0:
        return
    for tomo, truth_tomo in truth.groupby("tomo"):
        voxel = voxel_size_of(voxel_size_angstrom, tomo)
        rows = false[picks.loc[false, "tomo"] == tomo]
        if len(rows) == 0:
            continue
        pick_xyz = picks.loc[rows, xyz].to_numpy()
        best_ratio = np.full(len(rows), np.inf)
        best_class = np.array([""] * len(rows), dtype=object)
        for name, truth_class in truth_tomo.groupby("class_name"):
            tolerance = tolerance_fraction * classes.by_name(name).radius_voxels(voxel)
            distance, _ = cKDTree(truth_class[xyz].to_numpy()).query(pick_xyz)
            ratio = distance / tolerance
            closer = (ratio <= 1.0) & (ratio < best_ratio)
            best_ratio[closer] = ratio[closer]
            best_class[closer] = name
        own = picks.loc[rows, "class_name"].to_numpy()
        on_particle = best_class != ""
        picks.loc[rows[on_particle & (best_class == own)], "duplicate"] = True
        other = on_particle & (best_class != own)
        picks.loc[rows[other], "confused_with"] = best_class[other]


def _few(names, limit: int = 5) -> str:
    names = sorted(names)
    text = ", ".join(repr(n) for n in names[:limit])
    return text + (f" … ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"


def fbeta_score(tp: int, fp: int, fn: int, beta: float = 1.0) -> float:
    """F-beta from counts: (1 + b²) TP / ((1 + b²) TP + b² FN + FP); 0 when undefined."""
    b2 = beta * beta
    denominator = (1 + b2) * tp + b2 * fn + fp
    return float((1 + b2) * tp / denominator) if denominator > 0 else 0.0


def _scores(tp: int, fp: int, fn: int, beta: float) -> dict:
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": fbeta_score(tp, fp, fn, 1.0),
        "fbeta": fbeta_score(tp, fp, fn, beta),
    }


def summarize(matching: Matching, beta: float = 1.0) -> dict:
    """{"classes": {name: {...}}, "macro": {...}, "micro": {...}} from a :class:`Matching`."""
    if not beta > 0:
        raise CryocapsError(f"--beta must be > 0, got {beta}")
    picks, truth = matching.picks, matching.truth
    result_classes = {}
    for particle_class in matching.classes:
        name = particle_class.name
        class_picks = picks[picks["class_name"] == name]
        class_truth = truth[truth["class_name"] == name]
        tp = int((class_picks["status"] == "tp").sum())
        fp = len(class_picks) - tp
        fn = int((class_truth["status"] == "fn").sum())
        entry = {"tp": tp, "fp": fp, "fn": fn, "n_picks": len(class_picks), "n_truth": len(class_truth)}
        if len(class_picks) or len(class_truth):
            entry |= _scores(tp, fp, fn, beta)
        else:
            entry |= {"precision": None, "recall": None, "f1": None, "fbeta": None}
        entry["duplicates"] = int(class_picks["duplicate"].sum())
        entry["confused"] = int((class_picks["confused_with"] != "").sum())
        entry["tolerance_angstrom"] = matching.tolerance_fraction * particle_class.radius_angstrom
        result_classes[name] = entry
    scored = [e for e in result_classes.values() if e["f1"] is not None]
    macro = {
        key: float(np.mean([e[key] for e in scored])) if scored else 0.0
        for key in ("precision", "recall", "f1", "fbeta")
    }
    macro |= {"beta": beta, "n_classes": len(scored)}
    totals = {key: sum(e[key] for e in result_classes.values()) for key in ("tp", "fp", "fn")}
    micro = totals | _scores(totals["tp"], totals["fp"], totals["fn"], beta) | {"beta": beta}
    return {"classes": result_classes, "macro": macro, "micro": micro}


def evaluate_picks(
    picks: pd.DataFrame,
    truth: pd.DataFrame,
    classes: ClassTable,
    voxel_size_angstrom: float | Mapping[str, float],
    tolerance_fraction: float = 0.5,
    beta: float = 1.0,
    *,
    tomograms: Collection[str] | None = None,
) -> dict:
    """Particle-level scores of ``picks`` against ``truth`` (what ``evaluate --json`` prints).

    ``tomograms`` limits the scoring to these tomogram names (see :func:`match_picks`).

    Returns {"classes": {name: {tp, fp, fn, n_picks, n_truth, precision, recall, f1,
    fbeta, duplicates, confused, tolerance_angstrom}}, "macro": {precision, recall,
    f1, fbeta, beta, n_classes}, "micro": {tp, fp, fn, precision, recall, f1, fbeta, beta}}.
    """
    matching = match_picks(picks, truth, classes, voxel_size_angstrom, tolerance_fraction, tomograms=tomograms)
    return summarize(matching, beta)


def confusion_table(matching: Matching) -> pd.DataFrame:
    """Rows: true class (+ "background"); columns: picked class (+ "missed").

    Diagonal: true positives. [B, A]: false positives of class A sitting on a particle
    of class B (class confusions). [background, A]: the other false positives of A
    (duplicates included). [B, missed]: particles of B that no pick found.
    """
    names = matching.classes.names
    table = pd.DataFrame(0, index=[*names, BACKGROUND], columns=[*names, MISSED], dtype=int)
    picks, truth = matching.picks, matching.truth
    for name in names:
        own = picks[picks["class_name"] == name]
        table.loc[name, name] = int((own["status"] == "tp").sum())
        false = own[own["status"] == "fp"]
        for other, count in false["confused_with"].value_counts().items():
            table.loc[other if other else BACKGROUND, name] += int(count)
        table.loc[name, MISSED] = int(((truth["class_name"] == name) & (truth["status"] == "fn")).sum())
    table.index.name = "true \\ picked"
    return table


# --- precision-recall over pick scores --------------------------------------


def precision_recall(scores: np.ndarray, is_true: np.ndarray, n_positives: int) -> dict:
    """Precision-recall curve over score thresholds and its area (average precision).

    ``scores`` and ``is_true`` describe the candidates (NaN scores rank last); every
    distinct score is a threshold. AUPRC = Σ (R_k - R_{k-1}) P_k, as scikit-learn's
    average precision. Returns {"threshold", "precision", "recall"} arrays and "auprc".
    """
    scores = np.asarray(scores, dtype=float)
    is_true = np.asarray(is_true, dtype=bool)
    if len(scores) == 0 or n_positives == 0:
        empty = np.array([])
        return {"threshold": empty, "precision": empty, "recall": empty, "auprc": 0.0}
    ranked = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-ranked, kind="stable")
    ranked, hits = ranked[order], is_true[order]
    true_positives = np.cumsum(hits)
    false_positives = np.cumsum(~hits)
    ends = np.r_[np.nonzero(np.diff(ranked))[0], len(ranked) - 1]  # last candidate of each tie
    tp, fp = true_positives[ends], false_positives[ends]
    precision = tp / (tp + fp)
    recall = tp / n_positives
    auprc = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return {"threshold": ranked[ends], "precision": precision, "recall": recall, "auprc": auprc}


def pick_precision_recall(matching: Matching) -> dict[str, dict]:
    """Per-class precision-recall curves over pick scores.

    For the curve, picks are matched greedily in descending score order (each takes
    the nearest free particle within tolerance), the usual rule for detection
    curves; at the lowest threshold the counts equal the Hungarian ones except in
    rare crowded cases.
    """
    from scipy.spatial import cKDTree

    picks, truth = matching.picks, matching.truth
    xyz = ["x", "y", "z"]
    curves = {}
    for name in matching.classes.names:
        class_picks = picks[picks["class_name"] == name]
        class_truth = truth[truth["class_name"] == name]
        hits = np.zeros(len(class_picks), dtype=bool)
        position = {index: k for k, index in enumerate(class_picks.index)}
        for tomo, tomo_picks in class_picks.groupby("tomo"):
            tomo_truth = class_truth[class_truth["tomo"] == tomo]
            if tomo_truth.empty:
                continue
            tolerance = matching.tolerance_voxels[(tomo, name)]
            tree = cKDTree(tomo_truth[xyz].to_numpy())
            taken = np.zeros(len(tomo_truth), dtype=bool)
            ranked = tomo_picks.assign(_rank=tomo_picks["score"].fillna(-np.inf)).sort_values(
                "_rank", ascending=False, kind="stable"
            )
            for index, pick in zip(ranked.index, ranked[xyz].to_numpy(), strict=True):
                near = tree.query_ball_point(pick, tolerance)
                free = [j for j in near if not taken[j]]
                if free:
                    distances = np.linalg.norm(tree.data[free] - pick, axis=1)
                    taken[free[int(np.argmin(distances))]] = True
                    hits[position[index]] = True
        curves[name] = precision_recall(class_picks["score"].to_numpy(), hits, len(class_truth))
    return curves


THRESHOLD_COLUMNS = ["class_name", "min_score", "precision", "recall", "f1", "f1_keep_all", "n_picks"]


def best_score_thresholds(matching: Matching, curves: dict[str, dict] | None = None) -> pd.DataFrame:
    """Per class, the pick-score threshold with the best F1 on this data (a validation set).

    Reads the best point off each class's precision-recall curve (see
    :func:`pick_precision_recall`); among equal F1 values the lowest threshold
    wins (it keeps the most picks). ``min_score`` lies halfway between the
    chosen score and the next lower one, so picks scoring like the kept ones
    on new data are kept too; it is NaN when keeping every pick is best.
    Feed the table to ``cluster-picks --thresholds`` for the other tomograms.

    Returns
    -------
    DataFrame with :data:`THRESHOLD_COLUMNS`: ``min_score`` and the precision,
    recall and F1 it gives here, ``f1_keep_all`` without it, ``n_picks`` seen.
    """
    curves = curves if curves is not None else pick_precision_recall(matching)
    rows = []
    for name in matching.classes.names:
        curve = curves[name]
        n_picks = int((matching.picks["class_name"] == name).sum())
        if len(curve["threshold"]) == 0:
            # no picks or no particles: F1 is 0 either way (no score without either)
            n_truth = int((matching.truth["class_name"] == name).sum())
            f1 = 0.0 if n_picks or n_truth else np.nan
            rows.append([name, np.nan, f1, f1, f1, f1, n_picks])
            continue
        precision, recall = curve["precision"], curve["recall"]
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        # thresholds descend: the last index among the maxima is the lowest threshold
        best = int(len(f1) - 1 - np.argmax(f1[::-1]))
        thresholds = curve["threshold"]
        if best == len(thresholds) - 1:
            min_score = np.nan
        elif not np.isfinite(thresholds[best + 1]):  # the rest are picks without a score
            min_score = float(thresholds[best])
        else:
            min_score = float((thresholds[best] + thresholds[best + 1]) / 2)
        rows.append([name, min_score, precision[best], recall[best], f1[best], f1[-1], n_picks])
    return pd.DataFrame(rows, columns=THRESHOLD_COLUMNS)


def read_score_thresholds(path: str | os.PathLike, classes: ClassTable) -> dict[str, float]:
    """``{class_name: min_score}`` from a ``pick_thresholds.csv`` (classes kept whole are left out)."""
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
            f"--thresholds {path}: no column {', '.join(missing)}; expected the pick_thresholds.csv "
            "that `cryocaps evaluate -o` writes"
        )
    thresholds = {}
    for name, value in zip(table["class_name"].astype(str), table["min_score"], strict=True):
        if name not in classes.names:
            raise CryocapsError(
                f"--thresholds {path}: class {name!r} is not in the class table ({', '.join(classes.names)})"
            )
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise CryocapsError(f"--thresholds {path}: min_score {value!r} of {name} is not a number") from None
        if np.isfinite(value):
            thresholds[name] = value
        elif not np.isnan(value):
            raise CryocapsError(f"--thresholds {path}: min_score {value} of {name} is not finite")
    return thresholds


# --- voxel level ------------------------------------------------------------


class VoxelScores:
    """Accumulates voxel-level counts (and probability histograms) over label-map pairs.

    Dice/F1 per class between predicted and true label maps and, when probabilities
    are added, the voxel precision-recall curve over ``n_bins`` probability bins
    (exact for float16 maps at 2048 bins, up to ties inside a bin).
    """

    def __init__(self, classes: ClassTable, n_bins: int = 2048):
        self.classes = classes
        self.n_bins = n_bins
        self.counts = {c.name: np.zeros(3, dtype=np.int64) for c in classes}  # tp, fp, fn
        self.total = 0
        self.histograms: dict[str, np.ndarray] | None = None  # name -> (2, n_bins): positives, negatives
        self.without_probabilities = 0

    def add(self, label_pred: np.ndarray, label_true: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """Add one tomogram: (Z, Y, X) label maps, optional (C, Z, Y, X) probabilities (channel = label)."""
        if label_pred.shape != label_true.shape:
            raise CryocapsError(
                f"label maps differ in shape: predicted {label_pred.shape}, true {label_true.shape}"
            )
        pred, true = _labels(label_pred), _labels(label_true)
        if probabilities is not None:
            if probabilities.ndim != 4 or tuple(probabilities.shape[1:]) != pred.shape:
                raise CryocapsError(
                    f"probability map shape {probabilities.shape} does not fit labels {pred.shape}"
                )
            if probabilities.shape[0] < self.classes.n_labels:
                raise CryocapsError(
                    f"probability map has {probabilities.shape[0]} channels; need {self.classes.n_labels}"
                )
            if self.histograms is None:
                self.histograms = {c.name: np.zeros((2, self.n_bins), dtype=np.int64) for c in self.classes}
        else:
            self.without_probabilities += 1
        self.total += pred.size
        for particle_class in self.classes:
            in_pred = pred == particle_class.label
            in_true = true == particle_class.label
            tp = int(np.count_nonzero(in_pred & in_true))
            self.counts[particle_class.name] += [
                tp,
                int(np.count_nonzero(in_pred)) - tp,
                int(np.count_nonzero(in_true)) - tp,
            ]
            if probabilities is not None:
                self.histograms[particle_class.name] += _histograms(
                    probabilities[particle_class.label], in_true, self.n_bins
                )

    def result(self) -> dict:
        """{"classes": {name: {dice, precision, recall, tp_voxels, fp_voxels, fn_voxels,
        positive_fraction[, auprc, auprc_baseline]}}, "macro": {dice[, auprc, auprc_baseline]}}.

        AUPRC is reported only when every tomogram came with probabilities; its chance
        level (a random score) is the positive fraction, as in the paper.
        """
        with_auprc = self.histograms is not None and self.without_probabilities == 0
        classes = {}
        for name, (tp, fp, fn) in self.counts.items():
            entry = {
                "dice": fbeta_score(tp, fp, fn, 1.0),
                "precision": tp / (tp + fp) if tp + fp else 0.0,
                "recall": tp / (tp + fn) if tp + fn else 0.0,
                "tp_voxels": int(tp),
                "fp_voxels": int(fp),
                "fn_voxels": int(fn),
                "positive_fraction": (tp + fn) / self.total if self.total else 0.0,
            }
            if with_auprc:
                entry["auprc"] = _histogram_auprc(*self.histograms[name])
                entry["auprc_baseline"] = entry["positive_fraction"]
            classes[name] = entry
        macro = {"dice": float(np.mean([e["dice"] for e in classes.values()]))}
        if with_auprc:
            macro["auprc"] = float(np.mean([e["auprc"] for e in classes.values()]))
            macro["auprc_baseline"] = float(np.mean([e["auprc_baseline"] for e in classes.values()]))
        return {"classes": classes, "macro": macro}


def voxel_metrics(
    label_pred: np.ndarray,
    label_true: np.ndarray,
    classes: ClassTable,
    probabilities: np.ndarray | None = None,
) -> dict:
    """Voxel-level Dice/F1 per class, and voxel AUPRC with its chance level given probabilities.

    Parameters
    ----------
    label_pred, label_true : (Z, Y, X) label maps (0 = background)
    probabilities : optional (C, Z, Y, X), channel = label

    Returns the dict of :meth:`VoxelScores.result`.
    """
    scores = VoxelScores(classes)
    scores.add(label_pred, label_true, probabilities)
    return scores.result()


def _labels(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.view(np.uint8) if array.dtype == np.int8 else array


def _histograms(probability: np.ndarray, positive: np.ndarray, n_bins: int) -> np.ndarray:
    counts = np.zeros((2, n_bins), dtype=np.int64)
    for z in range(0, probability.shape[0], 16):  # slabs: memory stays small for big maps
        values = np.asarray(probability[z : z + 16], dtype=np.float32)
        bins = np.clip((values * n_bins).astype(np.int64), 0, n_bins - 1)
        truth = positive[z : z + 16]
        counts[0] += np.bincount(bins[truth], minlength=n_bins)
        counts[1] += np.bincount(bins[~truth], minlength=n_bins)
    return counts


def _histogram_auprc(positives: np.ndarray, negatives: np.ndarray) -> float:
    n_positive = int(positives.sum())
    if n_positive == 0:
        return 0.0
    # Highest bin first: each bin is one threshold.
    tp = np.cumsum(positives[::-1])
    fp = np.cumsum(negatives[::-1])
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = tp / n_positive
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def evaluate_label_files(
    predicted: Sequence[str | os.PathLike],
    true: Sequence[str | os.PathLike],
    classes: ClassTable,
    *,
    use_probabilities: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict, list[str]]:
    """Voxel scores of predicted label maps against true ones, paired by tomogram name.

    ``<tomo>_labels.mrc`` pairs with ``<tomo>.mrc`` or ``<tomo>_labels.mrc``;
    ``<tomo>_probs.mrc`` beside a predicted map adds voxel AUPRC. Returns
    (:meth:`VoxelScores.result`, tomogram names scored).
    """
    from cryocaps.io.layout import companion_path
    from cryocaps.io.volumes import base_tomogram_name, read_tomogram, tomogram_name

    def by_name(paths, flag):
        table = {}
        for path in map(Path, paths):
            name = base_tomogram_name(tomogram_name(path))
            if name in table:
                raise CryocapsError(f"{flag}: two label maps for tomogram {name!r}: {table[name]} and {path}")
            table[name] = path
        return table

    predicted_maps = by_name(predicted, "--labels-pred")
    true_maps = by_name(true, "--labels-true")
    common = sorted(set(predicted_maps) & set(true_maps))
    if not common:
        raise CryocapsError(
            "--labels-pred and --labels-true share no tomogram: predicted "
            f"{_few(predicted_maps)}, true {_few(true_maps)}"
        )
    for name in sorted(set(predicted_maps) ^ set(true_maps)):
        log.warning("tomogram %s has no %s label map; skipped", name,
                    "true" if name in predicted_maps else "predicted")
    scores = VoxelScores(classes)
    for name in common:
        pred = read_tomogram(predicted_maps[name])
        true_map = read_tomogram(true_maps[name])
        if abs(pred.voxel_size_angstrom - true_map.voxel_size_angstrom) > 1e-3 * true_map.voxel_size_angstrom:
            log.warning(
                "%s: voxel size %g Å differs from %s (%g Å)", predicted_maps[name], pred.voxel_size_angstrom,
                true_maps[name], true_map.voxel_size_angstrom,
            )
        probabilities = None
        probs_path = companion_path(predicted_maps[name], "probs") if use_probabilities else None
        if probs_path is not None:
            probabilities = read_tomogram(
                probs_path, allow_stack=True, mmap=True, check_finite=False,
                voxel_size_angstrom=pred.voxel_size_angstrom,
            ).data
        try:
            scores.add(pred.data, true_map.data, probabilities)
        except CryocapsError as error:
            raise CryocapsError(f"{predicted_maps[name]}: {error}") from None
        if progress is not None:
            progress(name)
    return scores.result(), common


# --- files and reports --------------------------------------------------------


def read_pick_file(path: str | os.PathLike, **read_options) -> pd.DataFrame:
    """Read a particle file; an empty file (0 bytes or no rows) is an empty table, with a warning."""
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
) -> tuple[dict, Matching]:
    """Read a pick file and a truth file (any format) and score them (see :func:`evaluate_picks`).

    The voxel size that turns class radii into voxels is ``voxel_size_angstrom`` when
    given, else each tomogram's own from ``tomograms`` (list of TomogramInfo). Given
    ``tomograms``, only those tomograms are scored. Returns (scores dict, :class:`Matching`).
    """
    if voxel_size_angstrom is None and not tomograms:
        raise CryocapsError(
            "need the voxel size to turn class radii (Å) into voxels: give --voxel-size-angstrom "
            "or the tomograms with --tomograms"
        )
    options = {
        "tomograms": tomograms,
        "classes": classes,
        "coords_pixel_size_angstrom": coords_pixel_size_angstrom,
    }
    picks = read_pick_file(picks_path, **options)
    truth = read_particles_checked(truth_path, options)
    voxel_sizes = (
        voxel_size_angstrom
        if voxel_size_angstrom is not None
        else {info.name: info.voxel_size_angstrom for info in tomograms}
    )
    try:
        names = [info.name for info in tomograms] if tomograms else None
        matching = match_picks(picks, truth, classes, voxel_sizes, tolerance_fraction, tomograms=names)
    except CryocapsError as error:
        raise CryocapsError(f"{picks_path} vs {truth_path}: {error}") from None
    return summarize(matching, beta), matching


def read_particles_checked(path, options: dict) -> pd.DataFrame:
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
    quantiles = (np.arange(1, n_slices + 1) / (n_slices + 1))
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
        for frame in (picks, truth[truth["status"] == "fn"]):  # status: tp/fp for picks, fn for misses
            for row in frame.itertuples(index=False):
                radius = radii[row.class_name]
                dz = abs(row.z - z)
                if dz >= radius:
                    continue
                section = max(1.5, float(np.sqrt(radius**2 - dz**2)))
                circles.append(Circle(row.x, row.y, section, row.status, row.class_name if show_class else ""))
        counts = {k: sum(c.outcome == k for c in circles) for k in ("tp", "fp", "fn")}
        title = f"z = {z} (mean of z {low}-{high - 1}): {counts['tp']} TP, {counts['fp']} FP, {counts['fn']} FN"
        panels.append((image, circles, title))
    return panels


REPORT_FILES = ("report.json", "confusion.csv", "pr_curve.png", "matches.csv", "pick_thresholds.csv")


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
) -> list[Path]:
    """Write report.json, confusion.csv, pr_curve.png, matches.csv, pick_thresholds.csv and overlay_<tomo>.png.

    ``overlays`` are tomogram MRC files whose picks are drawn (``overlay_<name>.png``).
    Existing files are refused unless ``overwrite``. Returns the files written.
    """
    from cryocaps.io.files import check_writable, write_text_atomic
    from cryocaps.io.volumes import read_tomogram, tomogram_name
    from cryocaps.plots import plot_overlay, plot_precision_recall

    report_dir = Path(report_dir)
    overlay_names = [f"overlay_{tomogram_name(p)}.png" for p in overlays]
    for name in (*REPORT_FILES, *overlay_names):
        check_writable(report_dir / name, overwrite)
    scored = set(matching.truth["tomo"]) | set(matching.picks["tomo"])
    for path in overlays:
        if tomogram_name(path) not in scored:
            raise CryocapsError(
                f"--overlay {path}: tomogram {tomogram_name(path)!r} has no scored picks or particles "
                f"(tomograms: {_few(scored)})"
            )
    curves = pick_precision_recall(matching)
    confusion = confusion_table(matching)
    report = {
        **scores,
        "auprc": {name: curve["auprc"] for name, curve in curves.items()},
        "confusion": {row: {col: int(v) for col, v in values.items()} for row, values in confusion.iterrows()},
        "per_tomogram": _per_tomogram(matching),
        "parameters": parameters or {},
    }
    written = [
        write_text_atomic(report_dir / "report.json", json.dumps(report, indent=2) + "\n"),
        write_text_atomic(report_dir / "confusion.csv", confusion.to_csv()),
        plot_precision_recall(curves, report_dir / "pr_curve.png"),
        write_text_atomic(report_dir / "matches.csv", _matches_csv(matching)),
        write_text_atomic(
            report_dir / "pick_thresholds.csv",
            best_score_thresholds(matching, curves).to_csv(index=False, float_format="%.6g"),
        ),
    ]
    for path, name in zip(overlays, overlay_names, strict=True):
        tomogram = read_tomogram(path, mmap=True, voxel_size_angstrom=overlay_voxel_size_angstrom)
        tomo = tomogram_name(path)
        try:
            panels = overlay_panels(tomogram.data, matching, tomo, tomogram.voxel_size_angstrom, n_slices)
        finally:
            tomogram.close()
        title = f"{tomo}: picks against truth (tolerance {matching.tolerance_fraction:g} × radius)"
        written.append(plot_overlay(panels, report_dir / name, title=title))
    return written


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
