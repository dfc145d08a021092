"""Particle files: conventions (golden values worked out by hand), real files, round trips,
errors.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.errors import CryocapsError
from cryocaps.io.formats.angles import (
    dynamo_to_relion,
    relion_to_dynamo,
    relion_to_stopgap,
    stopgap_to_relion,
)
from cryocaps.io.particles import (
    FORMATS,
    detect_format,
    read_particles,
    tomogram_infos,
    write_particles,
    write_tomograms_star,
)
from cryocaps.io.volumes import TomogramInfo

XYZ = ["x", "y", "z"]
ANGLES = ["rot", "tilt", "psi"]


# --- independent rotation matrices ----------------------------------------------
def relion_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's Euler_angles2matrix(rot, tilt, psi), written out element by element."""
    a, b, g = np.radians([rot, tilt, psi])
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


def stopgap_matrix(phi, psi, the) -> np.ndarray:
    """STOPGAP/TOM: rotate by phi about z, then the about x, then psi about z (fixed axes)."""
    rz = lambda angle: Rotation.from_euler("z", angle, degrees=True)  # noqa: E731
    rx = lambda angle: Rotation.from_euler("x", angle, degrees=True)  # noqa: E731
    return (rz(psi) * rx(the) * rz(phi)).as_matrix()


def dynamo_matrix(tdrot, tilt, narot) -> np.ndarray:
    """Dynamo: the transpose of the extrinsic zxz matrix of (tdrot, tilt, narot) aligns reference
    to particle.
    """
    return Rotation.from_euler("zxz", [tdrot, tilt, narot], degrees=True).as_matrix().T


def test_rotation_matrices_agree_across_conventions():
    rng = np.random.default_rng(1)
    relion = np.column_stack(
        [rng.uniform(-180, 180, 20), rng.uniform(0, 180, 20), rng.uniform(-180, 180, 20)]
    )
    stopgap = relion_to_stopgap(relion)
    dynamo = relion_to_dynamo(relion)
    for r, s, d in zip(relion, stopgap, dynamo, strict=True):
        np.testing.assert_allclose(stopgap_matrix(*s), relion_matrix(*r), atol=1e-9)
        np.testing.assert_allclose(dynamo_matrix(*d), relion_matrix(*r), atol=1e-9)
    for back in (stopgap_to_relion(stopgap), dynamo_to_relion(dynamo)):
        for r, b in zip(relion, back, strict=True):
            np.testing.assert_allclose(relion_matrix(*b), relion_matrix(*r), atol=1e-9)


def test_simple_rotation_matches_by_hand():
    # RELION's matrix for rot = 90 alone is [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], a -90° turn about z:
    # STOPGAP turns by phi + psi about z, so phi + psi = -90; Dynamo's matrix is the transpose
    # of a turn by tdrot + narot, so tdrot + narot = +90 (cryoCAT: phi = -narot, psi = -tdrot).
    np.testing.assert_allclose(
        relion_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12
    )
    phi, psi, the = relion_to_stopgap(np.array([[90.0, 0, 0]]))[0]
    assert the == pytest.approx(0) and (phi + psi) % 360 == pytest.approx(270)
    tdrot, tilt, narot = relion_to_dynamo(np.array([[90.0, 0, 0]]))[0]
    assert tilt == pytest.approx(0) and (tdrot + narot) % 360 == pytest.approx(90)


# --- conventions: golden values ---------------------------------------------------------
def write_text(path, text):
    path.write_text(text)
    return path


TOMO = TomogramInfo("TS_01", (40, 60, 80), 10.0)  # z, y, x


def test_relion5_centre_is_half_the_size(tmp_path):
    star = write_text(
        tmp_path / "p.star",
        "data_particles\n\nloop_\n_rlnTomoName\n_rlnCenteredCoordinateXAngst\n"
        "_rlnCenteredCoordinateYAngst\n_rlnCenteredCoordinateZAngst\n"
        "TS_01 0 0 0\nTS_01 100 -50 25\n",
    )
    table = read_particles(star, tomograms=[TOMO])
    np.testing.assert_allclose(table[XYZ].to_numpy(), [[40, 30, 20], [50, 25, 22.5]])
    assert table["class_name"].tolist() == ["1", "1"]
    assert table["score"].isna().all()


def test_stopgap_orig_1_is_voxel_0(tmp_path):
    star = write_text(
        tmp_path / "m.star",
        "data_stopgap_motivelist\n\nloop_\n_motl_idx\n_tomo_num\n_object\n_subtomo_num\n_halfset\n"
        "_orig_x\n_orig_y\n_orig_z\n_score\n_x_shift\n_y_shift\n_z_shift\n_phi\n_psi\n_the\n_class\n"
        "1 1 1 1 A 1 1 1 0.5 0 0 0 0 0 0 2\n2 1 1 2 B 10 20 30 0.25 0.5 -0.25 1 0 0 0 1\n",
    )
    table = read_particles(star, tomograms=[TOMO])
    np.testing.assert_allclose(table[XYZ].to_numpy(), [[0, 0, 0], [9.5, 18.75, 30]])
    assert table["tomo"].tolist() == ["TS_01", "TS_01"]
    assert table["class_name"].tolist() == ["2", "1"]
    np.testing.assert_allclose(table["score"], [0.5, 0.25])


def test_dynamo_x_1_is_voxel_0(tmp_path):
    row = np.zeros(35)
    row[[0, 19, 21, 23, 24, 25]] = [1, 1, 3, 1, 1, 1]
    row2 = row.copy()
    row2[[3, 4, 5, 9, 23, 24, 25]] = [0.5, -0.5, 0.25, 0.75, 11, 21, 31]
    tbl = tmp_path / "t.tbl"
    tbl.write_text("\n".join(" ".join(f"{v:g}" for v in r) for r in (row, row2)) + "\n")
    table = read_particles(tbl, tomograms=[TOMO])
    np.testing.assert_allclose(table[XYZ].to_numpy(), [[0, 0, 0], [10.5, 19.5, 30.25]])
    assert table["class_name"].tolist() == ["3", "3"]
    assert table["score"].tolist() == [0, 0.75]


def test_relion4_bin1_pixels_become_tomogram_voxels(tmp_path):
    star = write_text(
        tmp_path / "r4.star",
        "data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnTomoTiltSeriesPixelSize\n1 2.5\n\n"
        "data_particles\n\nloop_\n_rlnTomoName\n_rlnCoordinateX\n_rlnCoordinateY\n_rlnCoordinateZ\n"
        "_rlnOriginXAngst\n_rlnOriginYAngst\n_rlnOriginZAngst\n_rlnOpticsGroup\n"
        "TS_01 100 200 40 5 0 -10 1\n",
    )
    # (coordinate - origin / pixel) * pixel / voxel:
    # (100 - 2) * 0.25, (200 - 0) * 0.25, (40 + 4) * 0.25
    table = read_particles(star, tomograms=[TOMO])
    np.testing.assert_allclose(table[XYZ].to_numpy(), [[24.5, 50, 11]])
    # the flag overrides the file's pixel size: (100 - 5/5) * 5/10, 200 * 5/10, (40 + 10/5) * 5/10
    table = read_particles(star, tomograms=[TOMO], coords_pixel_size_angstrom=5.0)
    np.testing.assert_allclose(table[XYZ].to_numpy(), [[49.5, 100, 21]])


def test_tomograms_star_sizes_are_divided_by_binning(tmp_path):
    star = write_text(
        tmp_path / "tomograms.star",
        "data_global\n\nloop_\n_rlnTomoName\n_rlnTomoTiltSeriesPixelSize\n_rlnTomoTomogramBinning\n"
        "_rlnTomoSizeX\n_rlnTomoSizeY\n_rlnTomoSizeZ\nTS_07.tomostar 1.5 4 4000 3000 1000\n",
    )
    (info,) = tomogram_infos(star)
    assert info.name == "TS_07"
    assert info.shape == (250, 750, 1000)
    assert info.voxel_size_angstrom == pytest.approx(6.0)


def test_tomograms_star_round_trip(tmp_path):
    infos = [TomogramInfo("TS_01", (64, 160, 170), 10.8), TomogramInfo("TS_02", (50, 60, 70), 10.8)]
    star = write_tomograms_star(
        tmp_path / "tomograms.star", infos, tomogram_paths=["t/TS_01.mrc", "t/TS_02.mrc"]
    )
    assert tomogram_infos(star) == infos
    with pytest.raises(CryocapsError, match="exists"):
        write_tomograms_star(star, infos)


def test_tomogram_infos_from_mrc_and_folder(tmp_path):
    from cryocaps.io.volumes import write_volume

    folder = tmp_path / "tomos"
    write_volume(folder / "TS_01.mrc", np.zeros((4, 5, 6), np.float32), 7.5)
    write_volume(folder / "TS_02.mrc", np.zeros((4, 5, 6), np.float32), 7.5)
    infos = tomogram_infos([folder])
    assert [(i.name, i.shape, i.voxel_size_angstrom) for i in infos] == [
        ("TS_01", (4, 5, 6), 7.5),
        ("TS_02", (4, 5, 6), 7.5),
    ]
    with pytest.raises(CryocapsError, match="no such"):
        tomogram_infos([tmp_path / "missing.mrc"])


# --- real files ----------------------------------------------------------------------------
@pytest.fixture
def cylindra_tomograms(real_files):
    return tomogram_infos(real_files / "relion5" / "cylindra_tomograms.star")


def test_real_cylindra_tomograms_star(cylindra_tomograms):
    # rlnTomoSizeX/Y/Z 84 136 44 at 10.52 Å, binning 1
    assert [(i.name, i.shape, i.voxel_size_angstrom) for i in cylindra_tomograms] == [
        ("TS_01", (44, 136, 84), 10.52),
        ("TS_02", (44, 136, 84), 10.52),
    ]


def test_real_relion5_picks(real_files, cylindra_tomograms):
    table = read_particles(
        real_files / "relion5" / "cylindra_picks_particles.star", tomograms=cylindra_tomograms
    )
    assert len(table) == 5 and table["tomo"].tolist() == ["TS_01"] * 3 + ["TS_02"] * 2
    # first row: -176.94, 765.48005, 11.16 Å from the centre of an 84 x 136 x 44 tomogram at 10.52 Å
    np.testing.assert_allclose(
        table.loc[0, XYZ].to_numpy(float),
        [-176.94 / 10.52 + 42, 765.48005 / 10.52 + 68, 11.16 / 10.52 + 22],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        table.loc[0, XYZ].to_numpy(float), [25.1806, 140.7643, 23.0608], atol=1e-4
    )
    assert "rot" not in table.columns


def test_real_relion5_refine3d_subtracts_origin_and_warns_outside(
    real_files, cylindra_tomograms, caplog
):
    with caplog.at_level(logging.WARNING, logger="cryocaps"):
        table = read_particles(
            real_files / "relion5" / "cylindra_refine3d_run_it050_data.star",
            tomograms=cylindra_tomograms,
        )
    assert len(table) == 5  # rows outside the tomogram are kept
    assert "outside" in caplog.text
    # row 2 of TS_01: y = -728.500014 Å with origin -1.55154 Å:
    # (-728.500014 + 1.55154) / 10.52 + 68 < 0
    np.testing.assert_allclose(
        table.loc[0, XYZ].to_numpy(float),
        [
            (-176.94 + 2.41904) / 10.52 + 42,
            (765.48005 - 2.498456) / 10.52 + 68,
            (11.16 + 6.78404) / 10.52 + 22,
        ],
        atol=1e-5,
    )
    assert table.loc[2, "y"] == pytest.approx((-728.500014 + 1.55154) / 10.52 + 68)
    assert table.loc[2, "y"] < 0
    np.testing.assert_allclose(
        table.loc[0, ANGLES].to_numpy(float), [-126.27895, 65.873044, 99.174441]
    )
    assert table["class_name"].tolist() == ["1"] * 5
    assert table.loc[0, "score"] == pytest.approx(0.208180)  # rlnMaxValueProbDistribution


def test_real_relion5_class3d_composes_subtomogram_orientation(real_files):
    tomograms = [
        TomogramInfo("TS_01", (100, 1000, 800), 2.7),
        TomogramInfo("TS_02", (100, 1000, 800), 2.7),
    ]
    table = read_particles(
        real_files / "relion5" / "cylindra_class3d_run_it025_data.star", tomograms=tomograms
    )
    assert len(table) == 10
    assert table["class_name"].tolist()[:5] == ["1", "1", "2", "2", "3"]
    # first row: subtomogram angles (174.931305, 90.261512, -129.54646), particle angles
    # (27.128677, 92.568990, 6.654494), origin (-3.75772, 4.342283, -3.75772) Å in the
    # subtomogram frame
    a_sub = relion_matrix(174.931305, 90.261512, -129.54646)
    a_part = relion_matrix(27.128677, 92.568990, 6.654494)
    np.testing.assert_allclose(
        relion_matrix(*table.loc[0, ANGLES].to_numpy(float)), a_sub @ a_part, atol=1e-6
    )
    centred = np.array([754.828605, -879.58025, 138.065739]) - a_sub @ np.array(
        [-3.75772, 4.342283, -3.75772]
    )
    np.testing.assert_allclose(
        table.loc[0, XYZ].to_numpy(float), centred / 2.7 + [400, 500, 50], atol=1e-5
    )


def test_real_relion4_pseudosubtomo(real_files):
    path = real_files / "relion34" / "cryocat_relion4_pseudosubtomo.star"
    assert detect_format(path) == "relion4"
    # bin-1 pixels of 1.971 Å (optics block) into a bin-4 tomogram of 7.884 Å
    table = read_particles(path, tomograms=[TomogramInfo("TS_017", (300, 1000, 1000), 7.884)])
    assert len(table) == 1746 and table["tomo"].nunique() == 13
    np.testing.assert_allclose(
        table.loc[0, XYZ].to_numpy(float),
        [
            (1700 - 1.260416 / 1.971) / 4,
            (428 - 2.364176 / 1.971) / 4,
            (944 - 3.783296 / 1.971) / 4,
        ],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        table.loc[0, ANGLES].to_numpy(float), [-61.71449, 150.606435, 110.442075]
    )
    assert table.loc[0, "score"] == pytest.approx(0.009516)
    # without tomograms the positions stay in the file's bin-1 pixels
    table = read_particles(path)
    assert table.loc[0, "x"] == pytest.approx(1700 - 1.260416 / 1.971)


def test_real_warp2_needs_its_pixel_size(real_files):
    path = real_files / "relion34" / "cryocat_warp2_tm_particles.star"
    tomograms = [TomogramInfo(f"TS_{k}", (200, 1000, 1000), 8.0) for k in (1, 11, 17, 23, 32)]
    table = read_particles(path, tomograms=tomograms, coords_pixel_size_angstrom=4.0)
    assert len(table) == 1218 and sorted(table["tomo"].unique()) == [
        "TS_1",
        "TS_11",
        "TS_17",
        "TS_23",
        "TS_32",
    ]
    np.testing.assert_allclose(
        table.loc[0, XYZ].to_numpy(float), [354.242 / 2, 397.132 / 2, 75.828 / 2]
    )
    # angles far outside ±360° describe the same rotation
    np.testing.assert_allclose(
        relion_matrix(*table.loc[0, ANGLES].to_numpy(float)),
        relion_matrix(3867.465, 671.269, 10742.958),
        atol=1e-9,
    )
    assert (table[ANGLES].abs() <= 180).all().all()
    assert table["class_name"].eq("1").all()


def test_real_relion30_warp(real_files):
    path = real_files / "relion34" / "cryocat_relion30_warp.star"
    assert detect_format(path) == "relion3"
    table = read_particles(path)  # pixel size not stated: the tomogram's own voxels
    assert table["tomo"].tolist() == ["01006_10.73Apx"] * 3
    np.testing.assert_allclose(table.loc[0, XYZ].to_numpy(float), [1028.455, 733.955, 422.955])
    tomogram = TomogramInfo("01006_10.73Apx", (500, 1000, 1000), 10.728)
    table = read_particles(path, tomograms=[tomogram], coords_pixel_size_angstrom=5.364)
    np.testing.assert_allclose(table.loc[0, XYZ].to_numpy(float), [514.2275, 366.9775, 211.4775])


def test_real_relion3_origin_in_pixels(real_files):
    table = read_particles(real_files / "relion34" / "czportal_relion3_origin_px.star")
    assert table["tomo"].tolist() == ["tomo_1"] * 2 + ["tomo_2"] * 3 + ["tomo_3"]
    # coordinate - origin: (4 + 1.2, 8 + 2.4, 12 + 3.2), ..., last row (3 - 2, 2 - 2, 1 - 2)
    np.testing.assert_allclose(table.loc[0, XYZ].to_numpy(float), [5.2, 10.4, 15.2])
    np.testing.assert_allclose(table.loc[5, XYZ].to_numpy(float), [1, 0, -1])
    np.testing.assert_allclose(table.loc[1, ANGLES].to_numpy(float), [-45, 90, 120])


def test_real_stopgap_motivelist(real_files):
    path = real_files / "stopgap" / "czportal_stopgap_motl.star"
    tomograms = [TomogramInfo(f"tomo_{k}", (20, 20, 20), 10.0) for k in (3, 1, 2)]
    table = read_particles(path, tomograms=tomograms)
    assert table["tomo"].tolist() == ["tomo_1"] * 2 + ["tomo_2"] * 3 + [
        "tomo_3"
    ]  # by name, not order
    # orig + shift - 1: (4 - 1.2 - 1, 8 - 2.4 - 1, 12 - 3.2 - 1)
    np.testing.assert_allclose(table.loc[0, XYZ].to_numpy(float), [1.8, 4.6, 7.8])
    np.testing.assert_allclose(table.loc[3, XYZ].to_numpy(float), [2, 7, 0])
    np.testing.assert_allclose(table["score"].iloc[:2], [0.1816, 0.1704])
    # phi 90, psi 180, the 45
    np.testing.assert_allclose(
        relion_matrix(*table.loc[0, ANGLES].to_numpy(float)), stopgap_matrix(90, 180, 45), atol=1e-9
    )
    # unnumbered tomogram names: the k-th tomogram given
    table = read_particles(
        path, tomograms=[TomogramInfo(n, (20, 20, 20), 10.0) for n in ("a", "b", "c")]
    )
    assert table["tomo"].tolist() == ["a"] * 2 + ["b"] * 3 + ["c"]
    # no tomograms: the number is the name
    assert read_particles(path)["tomo"].tolist() == ["1"] * 2 + ["2"] * 3 + ["3"]


def test_real_dynamo_tables(real_files):
    folder = real_files / "dynamo"
    table = read_particles(folder / "dynamotable_t_double.tbl")
    assert len(table) == 300 and table["tomo"].nunique() == 2
    assert sorted(table["class_name"].astype(int).unique()) == list(range(1, 11))
    # x + dx - 1: 141.28 + 2.5178 - 1, 114.71 - 3.523 - 1, 163.08 + 2.1043 - 1; class 9; cc 0.15858
    np.testing.assert_allclose(
        table.loc[0, XYZ].to_numpy(float), [142.7978, 110.187, 164.1843], atol=1e-9
    )
    assert table.loc[0, "class_name"] == "9" and table.loc[0, "score"] == pytest.approx(0.15858)
    np.testing.assert_allclose(
        relion_matrix(*table.loc[0, ANGLES].to_numpy(float)),
        dynamo_matrix(175.66, 90.681, -129.51),
        atol=1e-9,
    )

    table = read_particles(folder / "dynamotable_t_complex.tbl")  # 41 columns, 0+1.2074e-06i tokens
    assert len(table) == 8742 and table["tomo"].nunique() == 48
    np.testing.assert_allclose(
        table.loc[1, XYZ].to_numpy(float),
        [1006.9 - 1.4208 - 1, 751.05 + 0.58177 - 1, 641.53 + 0.57748 - 1],
    )

    table = read_particles(folder / "cryocat_b4_26col.tbl")  # only 26 columns
    assert len(table) == 1343 and table["tomo"].nunique() == 70
    np.testing.assert_allclose(table.loc[0, XYZ].to_numpy(float), [507.0651, 548.1602, 166.6847])
    assert table.loc[0, "tomo"] == "2"

    table = read_particles(folder / "dynamo2m_example.tbl")  # positions ending in .5
    assert len(table) == 4934 and table["tomo"].nunique() == 48
    np.testing.assert_allclose(
        table.loc[0, XYZ].to_numpy(float),
        [508.5 - 1.1651 - 1, 378.5 - 2.3275 - 1, 318.5 + 3.8319 - 1],
    )


def test_every_real_particle_file_is_read(real_files, cylindra_tomograms):
    files = sorted(
        p
        for p in real_files.rglob("*")
        if p.suffix in (".star", ".tbl") and "tomograms" not in p.name
    )
    assert len(files) == 12
    for path in files:
        tomograms = cylindra_tomograms if path.parent.name == "relion5" else None
        table = read_particles(path, tomograms=tomograms)
        assert len(table) > 0 and np.isfinite(table[XYZ].to_numpy(float)).all(), path


# --- round trips ------------------------------------------------------------------------------
CLASSES = ClassTable([ParticleClass(1, "ribosome", 120.0), ParticleClass(2, "proteasome", 80.0)])
TOMOGRAMS = [TomogramInfo("TS_01", (30, 50, 70), 10.0), TomogramInfo("TS_02", (40, 60, 64), 10.0)]


@pytest.fixture
def picks() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    n = 12
    return pd.DataFrame(
        {
            "tomo": ["TS_01"] * 7 + ["TS_02"] * 5,
            "class_name": rng.choice(["ribosome", "proteasome"], n),
            "x": rng.uniform(0, 60, n),
            "y": rng.uniform(0, 50, n),
            "z": rng.uniform(0, 30, n),
            "score": rng.uniform(0, 1, n),
            "rot": rng.uniform(-180, 180, n),
            "tilt": rng.uniform(0, 180, n),
            "psi": rng.uniform(-180, 180, n),
        }
    )


def assert_same_picks(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-4) -> None:
    assert b["tomo"].tolist() == a["tomo"].tolist()
    assert b["class_name"].tolist() == a["class_name"].tolist()
    np.testing.assert_allclose(b[XYZ].to_numpy(float), a[XYZ].to_numpy(float), atol=atol)
    np.testing.assert_allclose(b["score"].to_numpy(float), a["score"].to_numpy(float), atol=1e-5)
    for r, s in zip(a[ANGLES].to_numpy(float), b[ANGLES].to_numpy(float), strict=True):
        np.testing.assert_allclose(relion_matrix(*s), relion_matrix(*r), atol=1e-4)


@pytest.mark.parametrize("format", FORMATS)
def test_every_writer_round_trips(tmp_path, picks, format):
    path = tmp_path / f"picks.{format}"
    write_particles(picks, path, format=format, tomograms=TOMOGRAMS, classes=CLASSES)
    assert detect_format(path) == format
    back = read_particles(path, tomograms=TOMOGRAMS, classes=CLASSES)
    assert_same_picks(picks, back)


@pytest.mark.parametrize("format", ["relion4", "relion3", "stopgap", "dynamo"])
def test_round_trip_at_another_pixel_size(tmp_path, picks, format):
    path = tmp_path / "picks.out"
    write_particles(
        picks,
        path,
        format=format,
        tomograms=TOMOGRAMS,
        classes=CLASSES,
        coords_pixel_size_angstrom=2.5,
    )
    back = read_particles(
        path, tomograms=TOMOGRAMS, classes=CLASSES, coords_pixel_size_angstrom=2.5
    )
    assert_same_picks(picks, back)
    unscaled = read_particles(path, classes=CLASSES, coords_pixel_size_angstrom=None)
    np.testing.assert_allclose(
        unscaled["x"], picks["x"] * 4, atol=1e-3
    )  # 10 Å voxels in 2.5 Å pixels


def test_relion4_written_with_its_pixel_size(tmp_path, picks):
    path = tmp_path / "r4.star"
    write_particles(
        picks,
        path,
        format="relion4",
        tomograms=TOMOGRAMS,
        classes=CLASSES,
        coords_pixel_size_angstrom=2.5,
    )
    import starfile

    blocks = starfile.read(path, always_dict=True)
    assert blocks["optics"]["rlnTomoTiltSeriesPixelSize"].tolist() == [2.5]
    np.testing.assert_allclose(blocks["particles"]["rlnCoordinateX"], picks["x"] * 4, atol=1e-5)
    # read with the pixel size from the file only
    assert_same_picks(picks, read_particles(path, tomograms=TOMOGRAMS, classes=CLASSES))


def test_relion5_writer_columns(tmp_path, picks):
    import starfile

    path = write_particles(picks, tmp_path / "p.star", tomograms=TOMOGRAMS, classes=CLASSES)
    particles = starfile.read(path, always_dict=True)["particles"]
    for column in (
        "rlnTomoName",
        "rlnCenteredCoordinateXAngst",
        "rlnAngleRot",
        "rlnClassNumber",
        "rlnAutopickFigureOfMerit",
    ):
        assert column in particles.columns
    assert particles["rlnClassNumber"].tolist() == [
        CLASSES.by_name(n).label for n in picks["class_name"]
    ]
    x0 = (picks.loc[0, "x"] - 35) * 10.0  # TS_01 is 70 voxels wide at 10 Å
    assert particles.loc[0, "rlnCenteredCoordinateXAngst"] == pytest.approx(x0, abs=1e-5)


def test_stopgap_writer_columns(tmp_path, picks):
    path = write_particles(
        picks, tmp_path / "m.star", format="stopgap", tomograms=TOMOGRAMS, classes=CLASSES
    )
    text = path.read_text()
    assert "data_stopgap_motivelist" in text
    import starfile

    motl = starfile.read(path, always_dict=True)["stopgap_motivelist"]
    assert list(motl.columns) == [
        "motl_idx",
        "tomo_num",
        "object",
        "subtomo_num",
        "halfset",
        "orig_x",
        "orig_y",
        "orig_z",
        "score",
        "x_shift",
        "y_shift",
        "z_shift",
        "phi",
        "psi",
        "the",
        "class",
    ]
    assert motl["tomo_num"].tolist() == [1] * 7 + [2] * 5
    assert set(motl["halfset"]) == {"A", "B"}
    assert (motl["orig_x"] == motl["orig_x"].round()).all()
    np.testing.assert_allclose(motl["orig_x"] + motl["x_shift"] - 1, picks["x"], atol=1e-5)


def test_dynamo_writer_has_35_columns(tmp_path, picks):
    path = write_particles(picks, tmp_path / "t.tbl", tomograms=TOMOGRAMS, classes=CLASSES)
    rows = [line.split() for line in path.read_text().splitlines()]
    assert len(rows) == 12 and {len(r) for r in rows} == {35}
    assert [int(r[19]) for r in rows] == [1] * 7 + [2] * 5


def test_csv_round_trip_without_class_table(tmp_path, picks):
    path = write_particles(picks, tmp_path / "p.csv")
    assert_same_picks(picks, read_particles(path))


def test_several_files_are_concatenated(tmp_path, picks):
    a = write_particles(
        picks.iloc[:7], tmp_path / "a.star", format="stopgap", tomograms=TOMOGRAMS, classes=CLASSES
    )
    b = write_particles(picks.iloc[7:], tmp_path / "b.csv")
    back = read_particles([a, b], tomograms=TOMOGRAMS, classes=CLASSES)
    assert_same_picks(picks, back)


# --- errors ------------------------------------------------------------------------------------
def test_relion5_without_tomogram_sizes_says_what_to_give(real_files):
    with pytest.raises(CryocapsError, match="--tomograms"):
        read_particles(real_files / "relion5" / "cylindra_picks_particles.star")


def test_reader_names_missing_columns(tmp_path):
    star = write_text(
        tmp_path / "m.star",
        "data_stopgap_motivelist\n\nloop_\n_motl_idx\n_tomo_num\n_orig_x\n1 1 5\n",
    )
    with pytest.raises(CryocapsError, match="orig_y, orig_z"):
        read_particles(star)
    star = write_text(
        tmp_path / "r.star", "data_particles\n\nloop_\n_rlnTomoName\n_rlnCoordinateX\nTS_01 5\n"
    )
    with pytest.raises(CryocapsError, match="rlnCoordinateY, rlnCoordinateZ"):
        read_particles(star)
    tbl = write_text(tmp_path / "short.tbl", " ".join(["1"] * 20) + "\n")
    with pytest.raises(CryocapsError, match="at least 26"):
        read_particles(tbl)


def test_unknown_class_number_is_refused(tmp_path, picks):
    path = write_particles(picks.assign(class_name="7"), tmp_path / "p.star", format="stopgap")
    with pytest.raises(CryocapsError, match="unknown class '7'"):
        read_particles(path, classes=CLASSES)


def test_class_names_need_a_class_table_to_be_numbered(tmp_path, picks):
    with pytest.raises(CryocapsError, match="--classes"):
        write_particles(picks, tmp_path / "m.tbl")
    assert not (tmp_path / "m.tbl").exists()


@pytest.mark.parametrize("format", FORMATS)
def test_empty_lists_round_trip(tmp_path, format):
    from cryocaps.io.particles import empty_table

    suffix = {"dynamo": ".tbl", "csv": ".csv"}.get(format, ".star")  # an empty file shows no format
    path = write_particles(
        empty_table(), tmp_path / f"empty{suffix}", format=format, tomograms=TOMOGRAMS
    )
    back = read_particles(path, tomograms=TOMOGRAMS)
    assert len(back) == 0 and list(back.columns[:6]) == [
        "tomo",
        "class_name",
        "x",
        "y",
        "z",
        "score",
    ]


def test_non_finite_positions_are_not_written(tmp_path, picks):
    picks.loc[3, "x"] = np.nan
    with pytest.raises(CryocapsError, match="non-finite"):
        write_particles(picks, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_label_maps_stand_in_for_their_tomograms(tmp_path, picks):
    labels = [TomogramInfo(f"{t.name}_labels", t.shape, t.voxel_size_angstrom) for t in TOMOGRAMS]
    path = write_particles(picks, tmp_path / "p.star", tomograms=labels, classes=CLASSES)
    assert_same_picks(picks, read_particles(path, tomograms=TOMOGRAMS, classes=CLASSES))
