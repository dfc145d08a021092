"""The whole chain, as `cryocaps demo` runs it, on tiny data."""

from __future__ import annotations

import json

import pandas as pd
import starfile


def test_demo_runs_every_stage(tmp_path, run_cli):
    out = tmp_path / "demo"
    result = run_cli("demo", out, "--minutes", "0.1", "--model", "unet", "--shape", "40,64,64", "--patch-size", "32")
    assert result.exit_code == 0, result.output
    for stage in ("simulate", "make-masks", "train", "segment", "cluster-picks", "evaluate"):
        assert f"$ cryocaps {stage}" in result.output
    assert "--thresholds" in result.output  # the test tomogram is picked with validation thresholds
    assert (out / "validation" / "report" / "pick_thresholds.csv").is_file()
    # every stage left its results
    assert (out / "run" / "config.json").is_file()
    assert (out / "segmentation" / "tomo_04_labels.mrc").is_file()
    assert (out / "segmentation" / "tomo_05_labels.mrc").is_file()
    picks = starfile.read(out / "picks.star")
    picks = picks["particles"] if isinstance(picks, dict) else picks
    assert {"rlnTomoName", "rlnCenteredCoordinateXAngst"} <= set(picks.columns) or picks.empty
    report = json.loads((out / "report" / "report.json").read_text())
    truth = pd.read_csv(out / "data" / "particles.csv")
    n_test = int((truth["tomo"] == "tomo_05").sum())
    counted = sum(c["tp"] + c["fn"] for c in report["classes"].values())
    assert counted == n_test  # scored against the held-out tomogram only


def test_demo_refuses_non_empty_folder(tmp_path, run_cli):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    result = run_cli("demo", tmp_path / "x")
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert (tmp_path / "x" / "file").read_text() == "keep me"
