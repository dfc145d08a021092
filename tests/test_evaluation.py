"""evaluate: one-to-one matching, exact counts, F-beta, AUPRC, voxel scores, reports, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.errors import CryocapsError
from cryocaps.evaluation import (
    REPORT_FILES,
    best_score_thresholds,
    confusion_table,
    evaluate_picks,
    fbeta_score,
    match_picks,
    pick_precision_recall,
    precision_recall,
    summarize,
    voxel_metrics,
    write_report,
)
from cryocaps.io.class_table import write_classes
from cryocaps.io.thresholds import read_score_thresholds
from cryocaps.io.volumes import write_volume

VOXEL = 10.0


@pytest.fixture
def classes() -> ClassTable:
    # radius 4 voxels -> tolerance 2 voxels for "ribo"; 8 voxels -> 4 for "proteasome"
    return ClassTable([ParticleClass(1, "ribo", 40.0), ParticleClass(2, "proteasome", 80.0)])


def _table(rows, tomo="TS_01") -> pd.DataFrame:
    frame = pd.DataFrame(
        rows, columns=["class_name", "x", "y", "z", *(["score"] if len(rows[0]) > 4 else [])]
    )
    frame.insert(0, "tomo", tomo)
    return frame


@pytest.fixture
def truth() -> pd.DataFrame:
    return _table(
        [
            ("ribo", 10, 10, 10),
            ("ribo", 30, 10, 10),
            ("ribo", 50, 10, 10),
            ("ribo", 70, 10, 10),
            ("proteasome", 10, 40, 10),
            ("proteasome", 40, 40, 10),
        ]
    )


def test_exact_counts_for_hand_made_picks(classes, truth):
    picks = _table(
        [
            ("ribo", 11, 10, 10.5, 0.9),  # jitter 1.1 voxels < 2: true positive
            ("ribo", 10, 11, 10, 0.5),  # second pick on the same particle: duplicate
            ("ribo", 32.5, 10, 10, 0.8),  # 2.5 voxels away > 2: false positive, particle missed
            ("ribo", 50, 11.9, 10, 0.7),  # 1.9 voxels: true positive
            # particle at x=70 is missed
            ("ribo", 40, 41, 10, 0.6),  # a ribosome pick on a proteasome: class confusion
            ("proteasome", 13, 40, 12, 0.95),  # 3.6 voxels < 4: true positive
            ("proteasome", 90, 90, 10, 0.3),  # nowhere: false positive
        ]
    )
    scores = evaluate_picks(picks, truth, classes, VOXEL, tolerance_fraction=0.5)
    ribo, proteasome = scores["classes"]["ribo"], scores["classes"]["proteasome"]
    assert (ribo["tp"], ribo["fp"], ribo["fn"]) == (2, 3, 2)
    assert (ribo["duplicates"], ribo["confused"]) == (1, 1)
    assert (proteasome["tp"], proteasome["fp"], proteasome["fn"]) == (1, 1, 1)
    assert ribo["precision"] == pytest.approx(2 / 5) and ribo["recall"] == pytest.approx(2 / 4)
    assert ribo["f1"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 2))
    assert scores["micro"]["tp"] == 3 and scores["micro"]["fp"] == 4 and scores["micro"]["fn"] == 3
    assert scores["micro"]["f1"] == pytest.approx(6 / 13)
    assert scores["macro"]["f1"] == pytest.approx((ribo["f1"] + proteasome["f1"]) / 2)
    assert set(scores) == {"classes", "macro", "micro"}

    # A wider tolerance turns the 2.5-voxel pick into a match.
    wider = evaluate_picks(picks, truth, classes, VOXEL, tolerance_fraction=0.7)
    assert wider["classes"]["ribo"]["tp"] == 3

    matching = match_picks(picks, truth, classes, VOXEL)
    confusion = confusion_table(matching)
    assert confusion.loc["ribo", "ribo"] == 2
    assert confusion.loc["proteasome", "ribo"] == 1  # the confusion
    assert confusion.loc["background", "ribo"] == 2  # duplicate + the 2.5-voxel pick
    assert confusion.loc["ribo", "missed"] == 2
    assert confusion.loc["background", "proteasome"] == 1
    assert confusion.loc["proteasome", "missed"] == 1


def test_matching_is_one_to_one_and_optimal(classes):
    # Pick A is nearest to particle 2 but also within tolerance of particle 1; pick B reaches
    # only particle 2. Nearest-first greedy matching would find one pair, Hungarian finds two.
    truth = _table([("ribo", 0, 0, 0), ("ribo", 3, 0, 0)])
    picks = _table([("ribo", 1.6, 0, 0), ("ribo", 4.5, 0, 0)])
    scores = evaluate_picks(picks, truth, classes, VOXEL)
    assert scores["classes"]["ribo"]["tp"] == 2
    # Two picks on one particle: one match only.
    scores = evaluate_picks(
        _table([("ribo", 0, 0, 0), ("ribo", 0.5, 0, 0)]), truth.iloc[:1], classes, VOXEL
    )
    assert (scores["classes"]["ribo"]["tp"], scores["classes"]["ribo"]["fp"]) == (1, 1)


def test_per_tomogram_matching_and_voxel_sizes(classes):
    truth = pd.concat([_table([("ribo", 10, 10, 10)], "A"), _table([("ribo", 10, 10, 10)], "B")])
    picks = pd.concat([_table([("ribo", 10, 10, 10)], "B"), _table([("ribo", 13, 10, 10)], "A")])
    # 3 voxels: outside the tolerance at 10 Å (2 voxels), inside at 5 Å/voxel (4 voxels)
    assert evaluate_picks(picks, truth, classes, VOXEL)["micro"]["tp"] == 1
    assert evaluate_picks(picks, truth, classes, {"A": 5.0, "B": 10.0})["micro"]["tp"] == 2
    with pytest.raises(CryocapsError, match="no voxel size"):
        evaluate_picks(picks, truth, classes, {"A": 5.0})
    # Scoring a chosen tomogram only: B's particles are neither found nor missed.
    only_a = evaluate_picks(picks, truth, classes, VOXEL, tomograms=["A"])["micro"]
    assert (only_a["tp"], only_a["fp"], only_a["fn"]) == (0, 1, 1)
    # A truth tomogram without picks: all its particles are missed.
    missed = evaluate_picks(picks[picks["tomo"] == "B"], truth, classes, VOXEL)["micro"]
    assert (missed["tp"], missed["fp"], missed["fn"]) == (1, 0, 1)
    with pytest.raises(CryocapsError, match="none of the tomograms"):
        evaluate_picks(picks, truth, classes, VOXEL, tomograms=["C"])


def test_class_numbers_and_absent_classes(classes, truth):
    picks = truth[truth["class_name"] == "ribo"].assign(
        class_name="1"
    )  # class numbers, as in STAR files
    scores = evaluate_picks(picks, truth[truth["class_name"] == "ribo"], classes, VOXEL)
    assert scores["classes"]["ribo"]["f1"] == 1.0
    assert scores["classes"]["proteasome"]["f1"] is None  # neither picks nor particles
    assert scores["macro"]["n_classes"] == 1 and scores["macro"]["f1"] == 1.0


def test_fbeta_formula():
    assert fbeta_score(3, 1, 2, beta=1) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert fbeta_score(3, 1, 2, beta=2) == pytest.approx(15 / 24)
    # Equivalent to the precision/recall form.
    precision, recall, beta = 3 / 4, 3 / 5, 4.0
    expected = (1 + beta**2) * precision * recall / (beta**2 * precision + recall)
    assert fbeta_score(3, 1, 2, beta=4) == pytest.approx(expected)
    assert fbeta_score(0, 0, 0) == 0.0


def test_beta_reaches_the_scores(classes, truth):
    picks = truth.iloc[:2]
    scores = evaluate_picks(picks, truth, classes, VOXEL, beta=4.0)
    ribo = scores["classes"]["ribo"]
    assert ribo["fbeta"] == pytest.approx(fbeta_score(2, 0, 2, 4.0))
    assert scores["micro"]["fbeta"] == pytest.approx(fbeta_score(2, 0, 4, 4.0))
    assert scores["macro"]["beta"] == 4.0


def test_auprc_known_cases():
    curve = precision_recall(
        np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False]), 3
    )
    # Σ ΔR·P = 1/3·1 + 0 + 1/3·2/3 + 0
    assert curve["auprc"] == pytest.approx(5 / 9)
    assert curve["precision"].tolist() == pytest.approx([1, 1 / 2, 2 / 3, 1 / 2])
    # Same as scikit-learn's average precision when every positive is a candidate.
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    scores = rng.random(200).round(2)  # ties included
    hits = rng.random(200) < 0.3
    assert precision_recall(scores, hits, int(hits.sum()))["auprc"] == pytest.approx(
        average_precision_score(hits, scores)
    )


def test_pick_precision_recall_orders_by_score(classes, truth):
    picks = _table(
        [
            ("ribo", 10, 10, 10, 0.9),
            ("ribo", 90, 90, 90, 0.8),  # a confident false positive
            ("ribo", 30, 10, 10, 0.7),
        ]
    )
    matching = match_picks(picks, truth, classes, VOXEL)
    curve = pick_precision_recall(matching)["ribo"]
    assert curve["auprc"] == pytest.approx(1 / 4 * 1 + 1 / 4 * 2 / 3)


def test_best_score_thresholds_drop_confident_false_positives(classes, truth):
    picks = _table(
        [
            ("ribo", 10, 10, 10, 0.9),
            ("ribo", 30, 10, 10, 0.8),
            ("ribo", 90, 90, 90, 0.3),  # false positives scoring low
            ("ribo", 80, 90, 90, 0.2),
            ("proteasome", 10, 40, 10, 0.1),  # a weak pick that is right: keep everything
            ("proteasome", 90, 40, 10, 0.6),
        ]
    )
    table = best_score_thresholds(match_picks(picks, truth, classes, VOXEL)).set_index("class_name")
    # ribo, descending: F1 0.4 (0.9), 0.667 (0.8), 0.571 (0.3), 0.5 (all) -> keep >= 0.8
    assert table.loc["ribo", "min_score"] == pytest.approx((0.8 + 0.3) / 2)
    assert table.loc["ribo", "f1"] == pytest.approx(2 / 3)
    assert table.loc["ribo", "f1_keep_all"] == pytest.approx(0.5)
    # proteasome: 0.6 alone is wrong (F1 0), both picks give P 0.5, R 0.5 -> keep all
    assert np.isnan(table.loc["proteasome", "min_score"])
    assert table.loc["proteasome", "f1"] == pytest.approx(0.5)
    # no picks of a class with particles: F1 0 and nothing to tune
    only_ribo = best_score_thresholds(
        match_picks(picks[picks["class_name"] == "ribo"], truth, classes, VOXEL)
    )
    assert only_ribo.set_index("class_name").loc["proteasome", "f1"] == 0.0


def test_read_score_thresholds(classes, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("class_name,min_score,f1\nribo,0.55,0.6\nproteasome,,0.5\n")
    assert read_score_thresholds(path, classes) == {"ribo": 0.55}
    path.write_text("class_name,min_score\nferritin,0.5\n")
    with pytest.raises(CryocapsError, match="ferritin"):
        read_score_thresholds(path, classes)
    path.write_text("class,score\nribo,0.5\n")
    with pytest.raises(CryocapsError, match="min_score"):
        read_score_thresholds(path, classes)
    with pytest.raises(CryocapsError, match="no such file"):
        read_score_thresholds(tmp_path / "missing.csv", classes)


def test_empty_picks_score_zero(classes, truth):
    empty = pd.DataFrame(columns=["tomo", "class_name", "x", "y", "z", "score"])
    scores = evaluate_picks(empty, truth, classes, VOXEL)
    assert scores["micro"]["f1"] == 0.0 and scores["micro"]["fn"] == len(truth)
    assert scores["classes"]["ribo"]["precision"] == 0.0


def test_bad_inputs(classes, truth):
    with pytest.raises(CryocapsError, match="no tomogram in common"):
        evaluate_picks(truth.assign(tomo="TS_99"), truth, classes, VOXEL)
    with pytest.raises(CryocapsError, match="not in the class table"):
        evaluate_picks(truth.assign(class_name="ferritin"), truth, classes, VOXEL)
    with pytest.raises(CryocapsError, match="tolerance"):
        evaluate_picks(truth, truth, classes, VOXEL, tolerance_fraction=0)
    with pytest.raises(CryocapsError, match="beta"):
        summarize(match_picks(truth, truth, classes, VOXEL), beta=-1)


def test_voxel_metrics():
    classes = ClassTable([ParticleClass(1, "a", 20.0), ParticleClass(2, "b", 20.0)])
    true = np.zeros((8, 8, 8), np.uint8)
    true[:2] = 1
    true[4:6] = 2
    pred = true.copy()
    pred[0] = 0  # half of class a missed
    pred[6] = 2  # one extra slab of class b
    result = voxel_metrics(pred, true.view(np.int8), classes)
    assert result["classes"]["a"]["dice"] == pytest.approx(2 * 64 / (64 + 128))
    assert result["classes"]["b"]["dice"] == pytest.approx(2 * 128 / (192 + 128))
    assert result["classes"]["a"]["positive_fraction"] == pytest.approx(128 / 512)
    # Perfect probabilities: AUPRC 1; constant ones: the chance level (positive fraction).
    perfect = np.stack([(true == k).astype(np.float16) for k in range(3)])
    assert voxel_metrics(pred, true, classes, perfect)["classes"]["a"]["auprc"] == pytest.approx(
        1.0
    )
    constant = np.full((3, 8, 8, 8), 0.5, np.float16)
    flat = voxel_metrics(pred, true, classes, constant)["classes"]["b"]
    assert flat["auprc"] == pytest.approx(flat["auprc_baseline"]) and flat["auprc_baseline"] == 0.25


# --- command line -------------------------------------------------------------


@pytest.fixture
def files(tmp_path, classes, truth):
    folder = tmp_path / "data"
    folder.mkdir()
    write_classes(classes, folder / "classes.csv")
    truth.to_csv(folder / "truth.csv", index=False)
    picks = truth.copy()
    picks["x"] += 1.0
    picks["score"] = np.linspace(1, 0.5, len(picks))
    picks = pd.concat([picks, _table([("ribo", 90, 90, 10, 0.2)])], ignore_index=True)
    picks.to_csv(folder / "picks.csv", index=False)
    return folder


def test_cli_json(run_cli, files):
    result = run_cli(
        "evaluate",
        files / "picks.csv",
        files / "truth.csv",
        "--voxel-size-angstrom",
        VOXEL,
        "--json",
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert set(scores) == {"classes", "macro", "micro"}
    assert (scores["micro"]["tp"], scores["micro"]["fp"], scores["micro"]["fn"]) == (6, 1, 0)
    for key in ("tp", "fp", "fn", "precision", "recall", "f1"):
        assert key in scores["classes"]["proteasome"]


@pytest.mark.slow
def test_cli_report_and_overlay(run_cli, files, tmp_path):
    volume = np.random.default_rng(0).normal(size=(24, 64, 100)).astype(np.float32)
    tomogram = tmp_path / "TS_01.mrc"
    write_volume(tomogram, volume, VOXEL)
    report = tmp_path / "report"
    result = run_cli(
        "evaluate",
        files / "picks.csv",
        files / "truth.csv",
        "--classes",
        files / "classes.csv",
        "--tomograms",
        tomogram,
        "-o",
        report,
        "--overlay",
        tomogram,
        "--beta",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert "ribo" in result.output and "F4" in result.output
    for name in (
        "report.json",
        "confusion.csv",
        "pr_curve.png",
        "matches.csv",
        "pick_thresholds.csv",
        "overlay_TS_01.png",
        "run.json",
    ):
        assert (report / name).is_file(), name
    thresholds = pd.read_csv(report / "pick_thresholds.csv")
    assert list(thresholds["class_name"]) == ["ribo", "proteasome"]
    content = json.loads((report / "report.json").read_text())
    assert content["micro"]["tp"] == 6 and content["micro"]["beta"] == 4.0
    assert content["auprc"]["ribo"] == pytest.approx(1.0)
    assert (report / "pr_curve.png").read_bytes()[:4] == b"\x89PNG"
    confusion = pd.read_csv(report / "confusion.csv", index_col=0)
    assert confusion.loc["ribo", "ribo"] == 4 and confusion.loc["background", "ribo"] == 1
    # Existing reports are kept unless --overwrite.
    again = run_cli(
        "evaluate",
        files / "picks.csv",
        files / "truth.csv",
        "--voxel-size-angstrom",
        VOXEL,
        "-o",
        report,
    )
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_cli_voxel_scores(run_cli, tmp_path):
    classes = ClassTable([ParticleClass(1, "a", 20.0)])
    true = np.zeros((8, 8, 8), np.uint8)
    true[2:5, 2:5, 2:5] = 1
    pred = true.copy()
    pred[2] = 0
    write_volume(tmp_path / "pred" / "TS_01_labels.mrc", pred, VOXEL, dtype="uint8")
    probs = np.stack([1.0 - true, true]).astype(np.float16)
    write_volume(tmp_path / "pred" / "TS_01_probs.mrc", probs, VOXEL, dtype="float16")
    write_volume(tmp_path / "true" / "TS_01.mrc", true, VOXEL, dtype="uint8")
    write_classes(classes, tmp_path / "classes.csv")
    result = run_cli(
        "evaluate",
        "--labels-pred",
        tmp_path / "pred",
        "--labels-true",
        tmp_path / "true",
        "--classes",
        tmp_path / "classes.csv",
        "--json",
        "-o",
        tmp_path / "voxel_report",
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    saved = json.loads((tmp_path / "voxel_report" / "voxel_report.json").read_text())
    assert saved["classes"] == scores["classes"] and saved["tomograms"] == ["TS_01"]
    assert (tmp_path / "voxel_report" / "run.json").is_file()
    assert scores["classes"]["a"]["dice"] == pytest.approx(2 * 18 / (18 + 27))
    assert scores["classes"]["a"]["auprc"] == pytest.approx(1.0)
    assert scores["classes"]["a"]["auprc_baseline"] == pytest.approx(27 / 512)


def test_cli_voxel_scores_refuse_other_voxel_sizes(run_cli, tmp_path):
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    write_classes(ClassTable([ParticleClass(1, "a", 20.0)]), tmp_path / "classes.csv")
    write_volume(tmp_path / "true" / "TS_01.mrc", labels, VOXEL, dtype="uint8")
    write_volume(tmp_path / "close" / "TS_01_labels.mrc", labels, VOXEL * 1.005, dtype="uint8")
    write_volume(tmp_path / "far" / "TS_01_labels.mrc", labels, VOXEL * 1.05, dtype="uint8")
    common = ["--labels-true", tmp_path / "true", "--classes", tmp_path / "classes.csv", "--json"]
    close = run_cli("evaluate", "--labels-pred", tmp_path / "close", *common)
    assert close.exit_code == 0, close.output
    assert json.loads(close.stdout)["classes"]["a"]["dice"] == pytest.approx(1.0)
    far = run_cli("evaluate", "--labels-pred", tmp_path / "far", *common, "-o", tmp_path / "report")
    assert far.exit_code == 2
    assert "TS_01_labels.mrc" in far.output and "voxel size" in far.output
    assert not (tmp_path / "report" / "voxel_report.json").exists()


def test_write_report_returns_the_thresholds_it_wrote(classes, truth, tmp_path):
    picks = _table(
        [("ribo", 10, 10, 10, 0.9), ("ribo", 30, 10, 10, 0.8), ("ribo", 90, 90, 90, 0.3)]
    )
    matching = match_picks(picks, truth, classes, VOXEL)
    report = write_report(tmp_path / "report", summarize(matching), matching)
    assert sorted(p.name for p in report.files) == sorted(REPORT_FILES)
    assert report.thresholds_path == tmp_path / "report" / "pick_thresholds.csv"
    on_disk = pd.read_csv(report.thresholds_path)
    pd.testing.assert_frame_equal(on_disk, report.thresholds, check_dtype=False, rtol=1e-5)
    # ribo: the 0.9 and 0.8 picks alone give P 1, R 2/4, F1 2/3; proteasome has no picks (F1 0)
    assert report.tuned_macro_f1() == pytest.approx((2 / 3 + 0.0) / 2)
    assert read_score_thresholds(report.thresholds_path, classes) == {"ribo": pytest.approx(0.55)}


def test_cli_empty_picks_is_valid(run_cli, files):
    empty = files / "empty.csv"
    empty.write_text("tomo,class_name,x,y,z,score\n")
    for path in (empty, files / "zero.csv"):
        path.touch()
        result = run_cli("evaluate", path, files / "truth.csv", "--voxel-size-angstrom", VOXEL)
        assert result.exit_code == 0, result.output
        assert "F1 = 0" in result.output


def test_cli_bad_inputs(run_cli, files, tmp_path):
    picks, truth = files / "picks.csv", files / "truth.csv"
    elsewhere = tmp_path / "elsewhere.csv"
    pd.read_csv(picks).assign(tomo="TS_99").to_csv(elsewhere, index=False)
    unknown = tmp_path / "unknown.csv"
    pd.read_csv(picks).assign(class_name="ferritin").to_csv(unknown, index=False)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "truth.csv").write_text(truth.read_text())
    cases = [
        ([elsewhere, truth, "--voxel-size-angstrom", VOXEL], "no tomogram in common"),
        ([unknown, truth, "--voxel-size-angstrom", VOXEL], "ferritin"),
        ([picks, truth], "--voxel-size-angstrom"),
        ([picks, lonely / "truth.csv", "--voxel-size-angstrom", VOXEL], "--classes"),
        ([picks, tmp_path / "missing.csv", "--voxel-size-angstrom", VOXEL], "missing.csv"),
        (
            [picks, truth, "--voxel-size-angstrom", VOXEL, "--tolerance-fraction", "0"],
            "--tolerance-fraction",
        ),
        ([picks, truth, "--voxel-size-angstrom", VOXEL, "--overlay", picks], "-o REPORT_DIR"),
        ([picks], "PICKS and TRUTH"),
    ]
    for args, expected in cases:
        result = run_cli("evaluate", *args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_overlay_panels_circle_outcomes(classes, truth):
    from cryocaps.evaluation import overlay_panels

    picks = _table(
        [("ribo", 10.5, 10, 10, 0.9), ("ribo", 90, 30, 11, 0.5)]
    )  # a hit and a false alarm
    matching = match_picks(picks, truth, classes, VOXEL)
    volume = np.zeros((20, 64, 100), np.float32)
    panels = overlay_panels(volume, matching, "TS_01", VOXEL, n_slices=1)
    assert len(panels) == 1
    image, circles, title = panels[0]
    assert image.shape == (64, 100) and "z = 10" in title
    outcomes = sorted((c.outcome, round(c.x), round(c.y)) for c in circles)
    # Particles within a radius of z = 10: every truth particle (z = 10) and both picks.
    assert outcomes == sorted(
        [
            ("tp", 10, 10),
            ("fp", 90, 30),
            ("fn", 30, 10),
            ("fn", 50, 10),
            ("fn", 70, 10),
            ("fn", 10, 40),
            ("fn", 40, 40),
        ]
    )
    radii = {(c.outcome, round(c.x)): c.radius for c in circles}
    assert radii[("fn", 30)] == pytest.approx(4.0)  # ribosome radius in the plane of its centre
    assert radii[("fp", 90)] == pytest.approx(np.sqrt(16 - 1))  # cut 1 voxel off its centre


def test_cli_overlay_of_unknown_tomogram_writes_nothing(run_cli, files, tmp_path):
    other = tmp_path / "TS_77.mrc"
    write_volume(other, np.zeros((8, 16, 16), np.float32), VOXEL)
    report = tmp_path / "report"
    result = run_cli(
        "evaluate",
        files / "picks.csv",
        files / "truth.csv",
        "--voxel-size-angstrom",
        VOXEL,
        "-o",
        report,
        "--overlay",
        other,
    )
    assert result.exit_code == 2 and "TS_77" in result.output
    assert not report.exists() or not any(report.iterdir())
