"""make-masks: sphere, Gaussian and template label maps, particle formats, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cryocaps.io.class_table import read_classes
from cryocaps.io.particles import tomogram_infos, write_particles
from cryocaps.io.volumes import read_tomogram, write_volume
from cryocaps.masks import Template, draw_gaussians, draw_spheres, draw_templates


def _brute_force(shape, centres, labels, radii):
    """Reference label map: every voxel against every particle."""
    grid = np.indices(shape).reshape(3, -1).T.astype(float)
    distance = np.sqrt(((grid[:, None, :] - centres[None]) ** 2).sum(-1))
    covered = distance <= radii[None]
    owner = np.where(covered, distance, np.inf).argmin(axis=1)
    return np.where(covered.any(axis=1), labels[owner], 0).reshape(shape)


@pytest.mark.parametrize("radius", [4.0, 6.5, 9.0])
def test_sphere_volume(radius):
    label_map = draw_spheres((32, 32, 32), [[15.7, 16.2, 16.0]], [3], [radius])
    assert label_map.dtype == np.uint8 and set(np.unique(label_map)) == {0, 3}
    volume = np.count_nonzero(label_map)
    assert volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.04)


def test_overlaps_go_to_the_nearer_centre():
    centres = np.array([[10.0, 10.0, 8.0], [10.0, 10.0, 14.0]])
    label_map = draw_spheres((20, 20, 24), centres, [1, 2], [5.0, 5.0])
    row = label_map[10, 10]
    assert list(row[3:11]) == [1] * 8  # x 3..10: nearer to x=8 (x=11 is exactly between)
    assert row[11] == 1  # tie: the first particle keeps it
    assert list(row[12:20]) == [2] * 8
    # a big sphere does not swallow a small neighbour's near half
    label_map = draw_spheres((20, 20, 30), [[10, 10, 10], [10, 10, 17]], [1, 2], [9.0, 3.0])
    assert label_map[10, 10, 15] == 2 and label_map[10, 10, 13] == 1


def test_random_spheres_match_brute_force():
    rng = np.random.default_rng(3)
    shape = (18, 22, 26)
    centres = rng.uniform(-1, np.array(shape), size=(30, 3))
    labels = rng.integers(1, 4, 30)
    radii = rng.uniform(1.5, 6, 30)
    np.testing.assert_array_equal(
        draw_spheres(shape, centres, labels, radii), _brute_force(shape, centres, labels, radii)
    )


def test_gaussian_values():
    label_map, value_map = draw_gaussians((21, 21, 21), [[10, 10, 10]], [2], [2.0])
    assert value_map.dtype == np.float16
    assert float(value_map[10, 10, 10]) == pytest.approx(1.0)
    assert float(value_map[10, 10, 14]) == pytest.approx(np.exp(-2.0), rel=1e-2)  # d = 2 sigma
    assert value_map[10, 10, 17] == 0 and label_map[10, 10, 17] == 0  # beyond 3 sigma
    assert label_map[10, 10, 16] == 2


def _arm_template(size=17):
    """Asymmetric template: a ball at the centre and an arm along +x."""
    density = np.zeros((size, size, size), np.float32)
    c = size // 2
    zz, yy, xx = np.indices(density.shape)
    density[(zz - c) ** 2 + (yy - c) ** 2 + (xx - c) ** 2 <= 4] = 1.0
    density[c, c, c : c + 7] = 1.0  # x = c..c+6
    return density


@pytest.mark.parametrize(
    "angles, direction_zyx",
    [
        ((0, 0, 0), (0, 0, 1)),  # no rotation: arm along +x
        ((90, 0, 0), (0, -1, 0)),  # rot 90: the orientation Rz(-90) takes +x to -y
        ((-90, 0, 0), (0, 1, 0)),
        ((0, 0, 90), (0, -1, 0)),  # psi turns about the same z axis when tilt is 0
        ((0, 90, 0), (1, 0, 0)),  # tilt 90: Ry(-90) takes +x to +z
    ],
)
def test_template_follows_relion_angles(angles, direction_zyx):
    template = Template(_arm_template(), 0.5)
    centre = np.array([16, 16, 16])
    label_map = draw_templates((33, 33, 33), [centre], [1], [template], [angles])
    tip = centre + 6 * np.array(direction_zyx)
    assert label_map[tuple(tip)] == 1
    assert label_map[tuple(centre - 6 * np.array(direction_zyx))] == 0
    assert np.count_nonzero(label_map) == np.count_nonzero(template.density > 0.5)


# --- command line -------------------------------------------------------------------
@pytest.fixture
def mask_project(tmp_path):
    """Two tomograms at 10 Å, a class table, and particles with angles (CSV, RELION 5, STOPGAP)."""
    rng = np.random.default_rng(1)
    for name in ("TS_01", "TS_02"):
        write_volume(
            tmp_path / "tomos" / f"{name}.mrc",
            rng.normal(size=(30, 48, 56)).astype(np.float32),
            10.0,
            origin_angstrom=(5.0, 6.0, 7.0),
        )
    write_volume(tmp_path / "arm.mrc", _arm_template(), 10.0)
    (tmp_path / "classes.csv").write_text(
        "label,name,radius_angstrom,template\n1,ribo,50,arm.mrc\n2,prot,30,arm.mrc\n"
    )
    particles = pd.DataFrame(
        {
            "tomo": ["TS_01", "TS_01", "TS_01", "TS_02", "TS_02"],
            "class_name": ["ribo", "prot", "ribo", "prot", "ribo"],
            "x": [10.0, 18.0, 40.0, 20.0, 35.0],
            "y": [12.0, 14.0, 30.0, 20.0, 25.0],
            "z": [10.0, 12.0, 20.0, 15.0, 14.0],
            "score": 1.0,
            "rot": [0.0, 30.0, 90.0, -40.0, 170.0],
            "tilt": [0.0, 45.0, 90.0, 120.0, 10.0],
            "psi": [0.0, 60.0, 0.0, 15.0, -100.0],
        }
    )
    infos = tomogram_infos([tmp_path / "tomos"])
    classes = read_classes(tmp_path / "classes.csv")
    files = {}
    for name, format in (
        ("particles.csv", "csv"),
        ("particles.star", "relion5"),
        ("motl.star", "stopgap"),
    ):
        files[format] = write_particles(
            particles, tmp_path / name, format=format, tomograms=infos, classes=classes
        )
    return tmp_path, particles, files


@pytest.mark.parametrize("shape", ["sphere", "template"])
def test_relion5_stopgap_and_csv_give_identical_maps(mask_project, run_cli, shape):
    root, particles, files = mask_project
    maps = {}
    for format, path in files.items():
        out = root / f"out_{format}_{shape}"
        result = run_cli(
            "make-masks",
            path,
            "--tomograms",
            root / "tomos",
            "-o",
            out,
            "--classes",
            root / "classes.csv",
            "--shape",
            shape,
        )
        assert result.exit_code == 0, (format, result.output)
        maps[format] = [read_tomogram(out / f"{name}_labels.mrc") for name in ("TS_01", "TS_02")]
    reference = maps["csv"]
    for format in ("relion5", "stopgap"):
        for mine, theirs in zip(maps[format], reference, strict=True):
            np.testing.assert_array_equal(mine.data, theirs.data, err_msg=format)
    first = reference[0]
    assert first.shape == (30, 48, 56) and first.voxel_size_angstrom == pytest.approx(10.0)
    assert first.origin_angstrom == pytest.approx((5.0, 6.0, 7.0))
    # each particle's centre carries its class label
    for row in particles.itertuples():
        label_map = reference[0 if row.tomo == "TS_01" else 1].data
        assert label_map[int(row.z), int(row.y), int(row.x)] == (
            1 if row.class_name == "ribo" else 2
        )


def test_cli_sphere_summary_run_json_and_classes(mask_project, run_cli):
    root, particles, files = mask_project
    out = root / "out"
    result = run_cli(
        "make-masks",
        files["csv"],
        "-t",
        root / "tomos",
        "-o",
        out,
        "--classes",
        root / "classes.csv",
    )
    assert result.exit_code == 0, result.output
    assert "ribo" in result.output and "prot" in result.output
    run = json.loads((out / "run.json").read_text())
    summary = run["results"]["classes"]
    assert summary["ribo"]["particles"] == 3 and summary["prot"]["particles"] == 2
    label_maps = [
        read_tomogram(out / f"{n}_labels.mrc").data.astype(np.uint8) for n in ("TS_01", "TS_02")
    ]
    assert summary["ribo"]["voxels"] == sum(int((m == 1).sum()) for m in label_maps)
    written = read_classes(out / "classes.csv")
    assert written.names == ["ribo", "prot"] and written.by_name("ribo").radius_angstrom == 50
    again = run_cli(
        "make-masks",
        files["csv"],
        "-t",
        root / "tomos",
        "-o",
        out,
        "--classes",
        root / "classes.csv",
    )
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_cli_radius_and_gaussian(mask_project, run_cli):
    root, _, files = mask_project
    out = root / "gauss"
    result = run_cli(
        "make-masks",
        files["relion5"],
        "-t",
        root / "tomos",
        "-o",
        out,
        "--radius-angstrom",
        "40",
        "--shape",
        "gaussian",
    )
    assert result.exit_code == 0, result.output
    targets = read_tomogram(out / "TS_01_labels.mrc", allow_stack=True)
    assert targets.data.dtype == np.float16
    assert targets.shape[-3:] == (30, 48, 56)
    stack = targets.data.reshape(2, 30, 48, 56).astype(np.float32)
    np.testing.assert_allclose(stack.sum(axis=0), 1.0, atol=2e-3)
    assert stack[1, 10, 12, 10] == pytest.approx(
        1.0, abs=1e-3
    )  # one class: every particle is class 1
    assert read_classes(out / "classes.csv").names == ["particle"]


def test_cli_radius_scale_and_coordinate_pixel_size(mask_project, run_cli):
    root, particles, _ = mask_project
    one = particles.iloc[[2]].assign(x=20.0, y=24.0, z=15.0)
    csv = root / "one.csv"
    one.to_csv(csv, index=False)
    out = root / "scaled"
    result = run_cli(
        "make-masks",
        csv,
        "-t",
        root / "tomos",
        "-o",
        out,
        "--radius-angstrom",
        "40",
        "--radius-scale",
        "0.5",
    )
    assert result.exit_code == 0, result.output
    label_map = read_tomogram(out / "TS_01_labels.mrc").data
    assert np.count_nonzero(label_map) == np.count_nonzero(
        draw_spheres(label_map.shape, [[15, 24, 20]], [1], [2.0])
    )
    # RELION 3 pixels at 5 Å (bin 1) land on the 10 Å tomogram's voxels after scaling
    bin1 = root / "bin1.star"
    bin1_table = one.assign(x=40.0, y=48.0, z=30.0, class_name="1")
    write_particles(bin1_table, bin1, format="relion3", tomograms=tomogram_infos([root / "tomos"]))
    result = run_cli(
        "make-masks",
        bin1,
        "-t",
        root / "tomos",
        "-o",
        root / "px",
        "--radius-angstrom",
        "20",
        "--coords-pixel-size-angstrom",
        "5",
    )
    assert result.exit_code == 0, result.output
    assert read_tomogram(root / "px" / "TS_01_labels.mrc").data[15, 24, 20] == 1


def test_reads_only_headers(mask_project, run_cli):
    root, _, files = mask_project
    header_only = root / "headers"
    header_only.mkdir()
    for name in ("TS_01", "TS_02"):
        data = (root / "tomos" / f"{name}.mrc").read_bytes()
        (header_only / f"{name}.mrc").write_bytes(data[:1024])  # header kept, voxels gone
    result = run_cli(
        "make-masks", files["csv"], "-t", header_only, "-o", root / "out", "--radius-angstrom", "30"
    )
    assert result.exit_code == 0, result.output
    assert read_tomogram(root / "out" / "TS_01_labels.mrc").shape == (30, 48, 56)


def test_unmatched_tomograms_and_outside_particles_are_reported(mask_project, run_cli):
    root, particles, _ = mask_project
    table = pd.concat(
        [
            particles.iloc[:3],
            particles.iloc[[0]].assign(tomo="TS_99"),
            particles.iloc[[0]].assign(x=500.0),
        ]
    )
    csv = root / "mixed.csv"
    table.to_csv(csv, index=False)
    result = run_cli(
        "make-masks", csv, "-t", root / "tomos", "-o", root / "out", "--radius-angstrom", "30"
    )
    assert result.exit_code == 0, result.output
    assert (
        "TS_99" in result.output
        and "outside" in result.output
        and "TS_02: no particles" in result.output
    )
    run = json.loads((root / "out" / "run.json").read_text())
    assert run["results"]["particles_outside"] == 1 and run["results"]["unknown_tomograms"] == [
        "TS_99"
    ]
    strict = run_cli(
        "make-masks",
        csv,
        "-t",
        root / "tomos",
        "-o",
        root / "strict",
        "--radius-angstrom",
        "30",
        "--strict",
    )
    assert strict.exit_code == 2 and "--strict" in strict.output
    assert not (root / "strict" / "TS_01_labels.mrc").exists()


def _bad_cases(root, particles):
    (root / "empty.csv").write_text("tomo,class_name,x,y,z,score\n")
    particles.assign(class_name="ghost").to_csv(root / "ghost.csv", index=False)
    particles.assign(x=particles.x * 20, y=particles.y * 20, z=particles.z * 20).to_csv(
        root / "angstrom.csv", index=False
    )
    particles.assign(x=[100.0, 100.0, 40.0, 100.0, 35.0]).to_csv(
        root / "bin1.csv", index=False
    )  # 3 of 5 outside
    write_volume(root / "other" / "TS_01.mrc", np.zeros((30, 48, 56), np.float32), 10.0)
    write_volume(root / "other" / "TS_02.mrc", np.zeros((30, 48, 56), np.float32), 5.0)
    classes = ["--classes", root / "classes.csv"]
    tomos = ["-t", root / "tomos"]
    return {
        "unknown class": (["ghost.csv", *tomos, *classes], "ghost"),
        "missing radius": (["particles.csv", *tomos], "--radius-angstrom"),
        "voxel size mismatch": (
            ["particles.csv", "-t", root / "other", *classes],
            "voxel sizes differ",
        ),
        "empty file": (["empty.csv", *tomos, *classes], "no particles"),
        "wrong units": (["angstrom.csv", *tomos, *classes], "--coords-pixel-size-angstrom"),
        "mostly outside": (["bin1.csv", *tomos, *classes], "3 of 5 particles lie outside"),
        "missing tomogram": (["particles.csv", "-t", root / "nope.mrc", *classes], "nope.mrc"),
        "missing coordinates": (["nope.star", *tomos, *classes], "nope.star"),
        "no template": (
            ["particles.csv", *tomos, "--radius-angstrom", "30", "--shape", "template"],
            "template",
        ),
        "bad shape": (["particles.csv", *tomos, *classes, "--shape", "cube"], "--shape"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown class",
        "missing radius",
        "voxel size mismatch",
        "empty file",
        "wrong units",
        "mostly outside",
        "missing tomogram",
        "missing coordinates",
        "no template",
        "bad shape",
    ],
)
def test_bad_input_exits_2_with_one_line(mask_project, run_cli, case, monkeypatch):
    root, particles, _ = mask_project
    args, expected = _bad_cases(root, particles)[case]
    monkeypatch.chdir(root)
    result = run_cli("make-masks", *args, "-o", root / "bad")
    assert result.exit_code == 2, (case, result.output)
    assert expected in result.output, (case, result.output)
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not list((root / "bad").glob("*_labels.mrc")) if (root / "bad").exists() else True


def test_drawing_touches_only_boxes_around_particles():
    """500 spheres in a 100x256x256 map: well under a second when only boxes are touched."""
    import time

    rng = np.random.default_rng(4)
    shape = (100, 256, 256)
    centres = rng.uniform(0, np.array(shape) - 1, size=(500, 3))
    started = time.perf_counter()
    label_map = draw_spheres(shape, centres, rng.integers(1, 4, 500), rng.uniform(3, 8, 500))
    assert (
        time.perf_counter() - started < 5.0
    )  # ~0.1 s here; a full-volume pass per particle takes minutes
    assert all(label_map[tuple(np.round(c).astype(int))] > 0 for c in centres)


def test_template_at_another_voxel_size_stays_centred(tmp_path):
    from cryocaps.classes import ParticleClass
    from cryocaps.masks import load_template

    zz, yy, xx = np.indices((31, 31, 31))
    squared = ((zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 15) ** 2) * 5.0**2  # Å², 5 Å voxels
    density = np.exp(-squared / (2 * 25.0**2)).astype(np.float32)  # half maximum at 29.4 Å
    write_volume(tmp_path / "ball.mrc", density, 5.0)
    template = load_template(ParticleClass(1, "ball", 30.0, tmp_path / "ball.mrc"), 7.0, 0.5)
    assert template.density.shape == (22, 22, 22)  # 31 * 5 / 7 = 22.1
    np.testing.assert_allclose(template.centre_zyx, [15 * 5 / 7] * 3)
    label_map = draw_templates((31, 31, 31), [[15, 15, 15]], [1], [template], [[0, 0, 0]])
    inside = np.argwhere(label_map == 1)
    np.testing.assert_allclose(inside.mean(axis=0), [15, 15, 15], atol=0.15)
    radius_voxels = 25.0 * np.sqrt(2 * np.log(2)) / 7.0
    assert len(inside) == pytest.approx(4 / 3 * np.pi * radius_voxels**3, rel=0.15)


def test_cli_voxel_size_for_headers_without_one(tmp_path, run_cli):
    import mrcfile

    with mrcfile.new(tmp_path / "TS_01.mrc") as mrc:
        mrc.set_data(np.zeros((20, 24, 28), np.float32))
        mrc.voxel_size = 0.0
    csv = tmp_path / "p.csv"
    csv.write_text("tomo,class_name,x,y,z\nTS_01,1,14,12,10\n")
    result = run_cli(
        "make-masks",
        csv,
        "-t",
        tmp_path / "TS_01.mrc",
        "-o",
        tmp_path / "out",
        "--radius-angstrom",
        "40",
    )
    assert result.exit_code == 2 and "--voxel-size-angstrom" in result.output
    result = run_cli(
        "make-masks",
        csv,
        "-t",
        tmp_path / "TS_01.mrc",
        "-o",
        tmp_path / "out",
        "--radius-angstrom",
        "40",
        "--voxel-size-angstrom",
        "10",
    )
    assert result.exit_code == 0, result.output
    label_map = read_tomogram(tmp_path / "out" / "TS_01_labels.mrc")
    assert label_map.voxel_size_angstrom == pytest.approx(10.0)
    assert np.count_nonzero(label_map.data) == np.count_nonzero(
        draw_spheres((20, 24, 28), [[10, 12, 14]], [1], [4.0])
    )


def test_overlapping_templates_match_brute_force():
    rng = np.random.default_rng(7)
    shape = (24, 26, 28)
    template = Template(_arm_template(), 0.5)
    centres = rng.uniform(4, np.array(shape) - 4, size=(8, 3))
    angles = rng.uniform(-180, 180, size=(8, 3))
    labels = np.arange(1, 9)
    label_map = draw_templates(shape, centres, labels, [template] * 8, angles)
    # reference: each particle drawn alone, then every voxel to the nearest covering centre
    alone = np.stack(
        [
            draw_templates(shape, [c], [1], [template], [a]) > 0
            for c, a in zip(centres, angles, strict=True)
        ]
    )
    grid = np.indices(shape).reshape(3, -1).T
    distance = np.sqrt(((grid[:, None, :] - centres[None]) ** 2).sum(-1)).T.reshape(8, *shape)
    owner = np.where(alone, distance, np.inf).argmin(axis=0)
    expected = np.where(alone.any(axis=0), labels[owner], 0)
    assert alone.sum() > np.count_nonzero(expected)  # the shapes do overlap
    np.testing.assert_array_equal(label_map, expected)


def _ball(radius):
    return 4 / 3 * np.pi * radius**3


HALF_MAXIMUM = np.sqrt(2 * np.log(2))  # a Gaussian exceeds 1/2 within this many sigmas


@pytest.mark.parametrize(
    "options, volume_of",
    [
        ([], lambda r, template: _ball(r)),
        (["--radius-scale", "0.5"], lambda r, template: _ball(r / 2)),
        (["--shape", "gaussian"], lambda r, template: _ball(r / 2 * HALF_MAXIMUM)),  # sigma = r/2
        (["--shape", "template"], lambda r, t: (t.density > t.threshold).sum() * 1e3),
    ],
)
def test_classes_csv_records_the_label_volume_picking_expects(
    mask_project, run_cli, options, volume_of
):
    from cryocaps.masks import load_template

    root, _, files = mask_project
    out = root / "volumes"
    result = run_cli(
        "make-masks", files["csv"], "-t", root / "tomos", "-o", out,
        "--classes", root / "classes.csv", *options,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = read_classes(out / "classes.csv")
    for particle_class in read_classes(root / "classes.csv"):
        template = load_template(particle_class, 10.0, 0.2)
        expected = volume_of(particle_class.radius_angstrom, template)
        recorded = written.by_name(particle_class.name)
        assert recorded.label_volume_angstrom3 == pytest.approx(expected, rel=1e-3)
        assert recorded.radius_angstrom == particle_class.radius_angstrom  # unscaled
    # each class's share of all voxels of the maps written (the over-segmentation reference)
    maps = [read_tomogram(p, allow_stack=True).data for p in sorted(out.glob("*_labels.mrc"))]
    maps = [m.view(np.uint8) for m in maps if m.ndim == 3]  # gaussian: soft targets, (C, Z, Y, X)
    for recorded in written if maps else []:
        share = sum(np.count_nonzero(m == recorded.label) for m in maps) / sum(m.size for m in maps)
        assert recorded.label_fraction == pytest.approx(share, rel=1e-3)
    if options == ["--shape", "template"]:  # what a particle covers in the map drawn
        label_map = read_tomogram(out / "TS_01_labels.mrc").data
        arm = written.by_name("ribo").label_volume_voxels(10.0)  # two ribos, at 0 and 90°
        assert np.count_nonzero(label_map == 1) == pytest.approx(2 * arm, rel=0.15)
