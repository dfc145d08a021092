"""`cryocaps convert-picks`: conversions through the CLI, summary, run.json, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cryocaps.io.volumes import write_volume

RELION5 = """
data_particles

loop_
_rlnTomoName
_rlnCenteredCoordinateXAngst
_rlnCenteredCoordinateYAngst
_rlnCenteredCoordinateZAngst
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnClassNumber
_rlnLCCmax
TS_01 0.0 0.0 0.0 10.0 20.0 30.0 1 0.9
TS_01 -123.4 56.7 -8.9 -170.0 95.0 45.5 2 0.8
TS_01 201.5 -180.25 77.0 33.0 150.0 -120.0 1 0.7
TS_02 -12.0 100.0 3.3 0.0 45.0 90.0 2 0.6
TS_02 64.4 -64.4 -30.1 120.0 10.0 -60.0 1 0.5
"""

CLASSES_CSV = "label,name,radius_angstrom\n1,ribosome,120\n2,proteasome,80\n"


@pytest.fixture
def project(tmp_path):
    """Two tomograms (MRC, 10 Å voxels), a RELION 5 particles.star and a class table."""
    tomograms = tmp_path / "tomograms"
    write_volume(tomograms / "TS_01.mrc", np.zeros((20, 40, 50), np.float32), 10.0)
    write_volume(tomograms / "TS_02.mrc", np.zeros((24, 30, 36), np.float32), 10.0)
    (tmp_path / "particles.star").write_text(RELION5)
    (tmp_path / "classes.csv").write_text(CLASSES_CSV)
    return tmp_path


def read_back(path, project, extra=()):
    from cryocaps.io.class_table import read_classes
    from cryocaps.io.particles import read_particles, tomogram_infos

    return read_particles(
        path,
        tomograms=tomogram_infos([project / "tomograms"]),
        classes=read_classes(project / "classes.csv"),
        **dict(extra),
    )


def matrices(table: pd.DataFrame) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler(
        "ZYZ", table[["rot", "tilt", "psi"]].to_numpy(float), degrees=True
    ).as_matrix()


def test_relion5_centre_lands_on_half_the_shape(run_cli, project):
    out = project / "out" / "picks.csv"
    result = run_cli(
        "convert-picks",
        project / "particles.star",
        "-o",
        out,
        "--tomograms",
        project / "tomograms",
        "--classes",
        project / "classes.csv",
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    # TS_01 is 50 x 40 x 20 voxels (x, y, z): centred (0, 0, 0) Å is voxel (25, 20, 10)
    np.testing.assert_allclose(table.loc[0, ["x", "y", "z"]].to_numpy(float), [25, 20, 10])
    # second row: -123.4 Å / 10 Å + 25 ...
    np.testing.assert_allclose(table.loc[1, ["x", "y", "z"]].to_numpy(float), [12.66, 25.67, 9.11])
    assert table["class_name"].tolist() == [
        "ribosome",
        "proteasome",
        "ribosome",
        "proteasome",
        "ribosome",
    ]
    np.testing.assert_allclose(table["score"], [0.9, 0.8, 0.7, 0.6, 0.5])


@pytest.mark.parametrize("format", ["stopgap", "dynamo", "relion4", "relion3", "csv"])
def test_relion5_to_format_and_back(run_cli, project, format):
    original = read_back(project / "particles.star", project)
    middle = project / "out" / f"picks_{format}.txt"
    back = project / "back" / "particles.star"
    common = ("--tomograms", project / "tomograms", "--classes", project / "classes.csv")
    result = run_cli(
        "convert-picks", project / "particles.star", "-o", middle, "--format", format, *common
    )
    assert result.exit_code == 0, result.output
    result = run_cli("convert-picks", middle, "-o", back, "--format", "relion5", *common)
    assert result.exit_code == 0, result.output
    table = read_back(back, project)
    assert table["tomo"].tolist() == original["tomo"].tolist()
    assert table["class_name"].tolist() == original["class_name"].tolist()
    assert (
        np.abs(
            table[["x", "y", "z"]].to_numpy(float) - original[["x", "y", "z"]].to_numpy(float)
        ).max()
        < 0.01
    )
    np.testing.assert_allclose(table["score"], original["score"], atol=1e-5)
    np.testing.assert_allclose(matrices(table), matrices(original), atol=1e-4)


def test_tomograms_star_instead_of_mrc_files(run_cli, project):
    (project / "tomograms.star").write_text(
        "data_global\n\nloop_\n_rlnTomoName\n_rlnTomoTiltSeriesPixelSize\n_rlnTomoTomogramBinning\n"
        "_rlnTomoSizeX\n_rlnTomoSizeY\n_rlnTomoSizeZ\n"
        "TS_01 2.5 4 200 160 80\nTS_02 2.5 4 144 120 96\n"
    )
    out = project / "out" / "m.star"
    result = run_cli(
        "convert-picks",
        project / "particles.star",
        "-o",
        out,
        "--format",
        "stopgap",
        "--tomograms",
        project / "tomograms.star",
    )
    assert result.exit_code == 0, result.output
    expected = read_back(project / "particles.star", project)
    np.testing.assert_allclose(
        read_back(out, project)[["x", "y", "z"]], expected[["x", "y", "z"]], atol=1e-5
    )


def test_summary_and_run_json(run_cli, project):
    out = project / "out" / "picks.tbl"
    result = run_cli(
        "convert-picks",
        project / "particles.star",
        "-o",
        out,
        "--tomograms",
        project / "tomograms",
        "--classes",
        project / "classes.csv",
    )
    assert result.exit_code == 0, result.output
    assert "5 particles" in result.output and "proteasome" in result.output
    assert len(out.read_text().splitlines()) == 5
    record = json.loads((out.parent / "run.json").read_text())
    assert record["results"]["particles"] == 5
    counts = {
        (r["tomo"], r["class_name"]): r["particles"]
        for r in record["results"]["per_tomogram_class"]
    }
    assert counts == {
        ("TS_01", "ribosome"): 2,
        ("TS_01", "proteasome"): 1,
        ("TS_02", "ribosome"): 1,
        ("TS_02", "proteasome"): 1,
    }


def test_several_inputs_into_one_file(run_cli, project):
    first = project / "a.csv"
    result = run_cli(
        "convert-picks",
        project / "particles.star",
        "-o",
        first,
        "--tomograms",
        project / "tomograms",
    )
    assert result.exit_code == 0, result.output
    out = project / "all.csv"
    result = run_cli("convert-picks", first, first, "-o", out)
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == 10


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_file(run_cli, tmp_path):
    result = run_cli("convert-picks", tmp_path / "nothere.star", "-o", tmp_path / "o.csv")
    assert_one_line_error(result, "nothere.star", "no such")


def test_star_without_coordinates(run_cli, tmp_path):
    star = tmp_path / "bad.star"
    star.write_text("data_particles\n\nloop_\n_rlnTomoName\n_rlnAngleRot\nTS_01 10\n")
    result = run_cli("convert-picks", star, "-o", tmp_path / "o.csv")
    assert_one_line_error(result, "bad.star", "rlnCoordinateX")


def test_empty_star(run_cli, tmp_path):
    star = tmp_path / "empty.star"
    star.write_text("")
    result = run_cli("convert-picks", star, "-o", tmp_path / "o.csv")
    assert_one_line_error(result, "empty.star", "empty")


def test_unknown_class(run_cli, project):
    (project / "one_class.csv").write_text("label,name,radius_angstrom\n1,ribosome,120\n")
    result = run_cli(
        "convert-picks",
        project / "particles.star",
        "-o",
        project / "o.csv",
        "--tomograms",
        project / "tomograms",
        "--classes",
        project / "one_class.csv",
    )
    assert_one_line_error(result, "particles.star", "unknown class '2'")


def test_stopgap_tomo_num_without_tomogram(run_cli, project):
    motl = project / "motl.star"
    motl.write_text(
        "data_stopgap_motivelist\n\nloop_\n_motl_idx\n_tomo_num\n_object\n_subtomo_num\n_halfset\n"
        "_orig_x\n_orig_y\n_orig_z\n_score\n_x_shift\n_y_shift\n_z_shift\n_phi\n_psi\n_the\n_class\n"
        "1 1 1 1 A 5 5 5 0.5 0 0 0 0 0 0 1\n2 7 1 2 B 5 5 5 0.5 0 0 0 0 0 0 1\n"
    )
    result = run_cli(
        "convert-picks", motl, "-o", project / "o.csv", "--tomograms", project / "tomograms"
    )
    assert_one_line_error(result, "motl.star", "tomo_num 7")


def test_relion5_without_tomograms(run_cli, project):
    result = run_cli("convert-picks", project / "particles.star", "-o", project / "o.csv")
    assert_one_line_error(result, "TS_01", "--tomograms")


def test_existing_output_is_refused(run_cli, project):
    out = project / "o.csv"
    out.write_text("keep me")
    args = (
        "convert-picks",
        project / "particles.star",
        "-o",
        out,
        "--tomograms",
        project / "tomograms",
    )
    assert_one_line_error(run_cli(*args), "--overwrite")
    assert out.read_text() == "keep me"
    assert run_cli(*args, "--overwrite").exit_code == 0
    assert len(pd.read_csv(out)) == 5


def test_bad_format_and_extension(run_cli, project):
    args = ("convert-picks", project / "particles.star", "--tomograms", project / "tomograms")
    assert_one_line_error(run_cli(*args, "-o", project / "o.txt"), "--format")
    assert_one_line_error(run_cli(*args, "-o", project / "o.csv", "--format", "eman2"), "eman2")
    assert not (project / "o.txt").exists()


def test_class_names_to_numbered_format_need_classes(run_cli, project):
    named = project / "named.csv"
    named.write_text("tomo,class_name,x,y,z,score\nTS_01,ribosome,1,2,3,0.5\n")
    result = run_cli("convert-picks", named, "-o", project / "o.tbl")
    assert_one_line_error(result, "ribosome", "--classes")
    assert not (project / "o.tbl").exists()


def test_many_tomograms_summarised_per_class(run_cli, real_files, tmp_path):
    out = tmp_path / "b4.csv"
    result = run_cli("convert-picks", real_files / "dynamo" / "cryocat_b4_26col.tbl", "-o", out)
    assert result.exit_code == 0, result.output
    assert (
        "1343 particles" in result.output and "70" in result.output
    )  # one class row: 70 tomograms
    table = pd.read_csv(out, dtype={"tomo": str})
    assert len(table) == 1343 and table["tomo"].nunique() == 70
