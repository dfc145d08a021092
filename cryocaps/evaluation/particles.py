"""Particle-level scores: matching picks to truth, P/R/F1/F-beta, confusions, PR curves.

Picks and true particles are matched one to one, per tomogram and class, by the
Hungarian algorithm on their distances; a pair counts only within the tolerance
``tolerance_fraction x class radius`` (voxels of that tomogram). Matched picks are
true positives, other picks false positives, unmatched particles false negatives.
A false positive within tolerance of an already matched particle of its own class
is a *duplicate*; one within tolerance of a particle of another class is a *class
confusion*. Over pick scores: per-class precision-recall curves, their area, and
the score threshold with the best F1 (``pick_thresholds.csv``).

Conventions: a class with neither picks nor particles has no scores (None) and is left
out of the macro mean; precision is 0 when a class has no picks, recall 0 when it has
no particles. F-beta = (1 + b²) TP / ((1 + b²) TP + b² FN + FP).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.io.thresholds import THRESHOLD_COLUMNS

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
            raise CryocapsError(
                f"no voxel size for tomogram {tomo!r}; give its MRC file or --voxel-size-angstrom"
            )
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
    if not tolerance_fraction > 0:
        raise CryocapsError(f"--tolerance-fraction must be > 0, got {tolerance_fraction}")
    picks = _canonical(picks, classes, "picks")
    truth = _canonical(truth, classes, "truth")
    picks, truth = _scored_tomograms(picks, truth, tomograms)
    pick_truth, pick_distance, tolerance_voxels = _match_by_group(
        picks, truth, classes, voxel_size_angstrom, tolerance_fraction
    )
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


def _scored_tomograms(
    picks: pd.DataFrame, truth: pd.DataFrame, tomograms: Collection[str] | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Picks and truth of the tomograms scored: ``tomograms`` if given, else those of the truth."""
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
        log.warning(
            "ignoring picks in %d tomogram(s) without truth: %s", len(outside), _few(outside)
        )
        picks = picks[picks["tomo"].isin(truth_tomos)].reset_index(drop=True)
    unpicked = truth_tomos - pick_tomos
    if unpicked and len(picks):
        log.warning(
            "no picks in %d tomogram(s) of the truth (%s): their particles count as missed",
            len(unpicked),
            _few(unpicked),
        )
    return picks, truth


def _match_by_group(
    picks: pd.DataFrame,
    truth: pd.DataFrame,
    classes: ClassTable,
    voxel_size_angstrom: float | Mapping[str, float],
    tolerance_fraction: float,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Match within each (tomogram, class): (truth row of each pick or -1, distance, tolerances)."""
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
        pick_index, truth_index, distance = _hungarian_within(
            picks.loc[pick_rows, xyz].to_numpy(), truth.loc[truth_rows, xyz].to_numpy(), tolerance
        )
        pick_truth[pick_rows[pick_index]] = truth_rows[truth_index]
        pick_distance[pick_rows[pick_index]] = distance
    return pick_truth, pick_distance, tolerance_voxels


def _hungarian_within(
    pick_xyz: np.ndarray, truth_xyz: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Most matches, then least total distance, between (N, 3) picks and (M, 3) particles.

    Returns the indices of matched picks and particles and their distances (voxels),
    every pair within ``tolerance``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(pick_xyz).sparse_distance_matrix(
        cKDTree(truth_xyz), tolerance, output_type="ndarray"
    )
    if len(pairs) == 0:
        return np.array([], dtype=int), np.array([], dtype=int), np.array([])
    matched_picks, matched_truth, distances = [], [], []
    n_picks, n_truth = len(pick_xyz), len(truth_xyz)
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
        matched_picks.append(p_ids[rows[good]])
        matched_truth.append(t_ids[cols[good]])
        distances.append(cost[rows[good], cols[good]])
    return np.concatenate(matched_picks), np.concatenate(matched_truth), np.concatenate(distances)


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
        entry = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "n_picks": len(class_picks),
            "n_truth": len(class_truth),
        }
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
    matching = match_picks(
        picks, truth, classes, voxel_size_angstrom, tolerance_fraction, tomograms=tomograms
    )
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
        table.loc[name, MISSED] = int(
            ((truth["class_name"] == name) & (truth["status"] == "fn")).sum()
        )
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


def best_score_thresholds(
    matching: Matching, curves: dict[str, dict] | None = None
) -> pd.DataFrame:
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
            f1 = np.where(
                precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0
            )
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
