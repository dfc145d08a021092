"""cryocaps simulate: geometry, physics, ground truth, determinism, structures, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryocaps.io.atoms import read_atoms
from cryocaps.simulate import (
    SimulationParameters,
    project_tilt_series,
    rotate_density,
    simulate_tomogram,
    tilt_angles,
    weighted_backprojection,
)
from cryocaps.structures import (
    ParticleTemplate,
    atoms_to_density,
    builtin_templates,
    load_structure_templates,
    relion_euler_to_matrix,
)

TINY = ["--n-tomograms", "1", "--shape", "32,64,64", "--voxel-size-angstrom", "20"]


def _read(path: Path) -> np.ndarray:
    with mrcfile.open(path) as mrc:
        return np.array(mrc.data)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """One tiny simulated data set (built-in classes, 20 Å voxels), made through the CLI."""
    from typer.testing import CliRunner

    from cryocaps.cli.main import app

    out = tmp_path_factory.mktemp("sim") / "out"
    result = CliRunner().invoke(app, ["simulate", str(out), *TINY, "--seed", "3", "--preview"])
    assert result.exit_code == 0, result.output
    return out


# --- outputs ------------------------------------------------------------------------


def test_writes_every_output(simulated):
    for name in [
        "tomograms/tomo_01.mrc", "labels/tomo_01.mrc", "particles.csv", "particles.star",
        "tomograms.star", "particles_stopgap.star", "classes.csv", "run.json",
        "preview_tomo_01.png",
        "templates/globule.mrc", "templates/ribosome.mrc",
    ]:  # fmt: skip
        assert (simulated / name).is_file(), name
    with mrcfile.open(simulated / "tomograms" / "tomo_01.mrc") as mrc:
        assert mrc.data.shape == (32, 64, 64)
        assert float(mrc.voxel_size.x) == pytest.approx(20.0)
    assert (simulated / "preview_tomo_01.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    classes = pd.read_csv(simulated / "classes.csv")
    assert list(classes.columns) == [
        "label",
        "name",
        "radius_angstrom",
        "template",
        "label_fraction",
    ]
    assert list(classes.name) == ["globule", "barrel", "dumbbell", "ribosome"]
    radii = dict(zip(classes.name, classes.radius_angstrom, strict=True))
    assert 25 <= radii["globule"] <= 45  # the small class: ~35 Å
    assert 110 <= radii["ribosome"] <= 140  # the large asymmetric class: ~125 Å
    assert radii["globule"] < radii["barrel"] < radii["dumbbell"] < radii["ribosome"]


def test_particle_files_agree(simulated):
    from cryocaps.io.class_table import read_classes
    from cryocaps.io.particles import read_particles, tomogram_infos

    classes = read_classes(simulated / "classes.csv")
    infos = tomogram_infos(simulated / "tomograms.star")
    assert infos[0].shape == (32, 64, 64) and infos[0].voxel_size_angstrom == pytest.approx(20.0)
    reference = read_particles(simulated / "particles.csv")
    assert len(reference) > 8
    for name in ("particles.star", "particles_stopgap.star"):
        table = read_particles(simulated / name, tomograms=infos, classes=classes)
        assert list(table.class_name) == list(reference.class_name)
        columns = ["x", "y", "z", "rot", "tilt", "psi"]
        np.testing.assert_allclose(
            table[columns].to_numpy(float), reference[columns].to_numpy(float), atol=1e-3
        )


def test_class_templates_work_for_make_masks(simulated):
    from cryocaps.io.class_table import read_classes
    from cryocaps.masks import load_template

    for particle_class in read_classes(simulated / "classes.csv"):
        template = load_template(particle_class, 20.0, threshold_fraction=0.5)
        assert template.density.shape[0] % 2 == 1  # centre on a voxel
        # the envelope radius in classes.csv is measured on the same density
        assert template.reach_voxels - 1 == pytest.approx(
            particle_class.radius_angstrom / 20 - 0.5, abs=0.1
        )


def test_label_at_each_particle_centre_is_its_class(simulated):
    labels = _read(simulated / "labels" / "tomo_01.mrc").astype(np.uint8)
    classes = pd.read_csv(simulated / "classes.csv")
    label_of = dict(zip(classes.name, classes.label, strict=True))
    particles = pd.read_csv(simulated / "particles.csv")
    for row in particles.itertuples():
        z, y, x = (int(round(v)) for v in (row.z, row.y, row.x))
        assert labels[z, y, x] == label_of[row.class_name], row
    # Particles sit inside the slab (default: 80% of the height) and inside the box.
    radius = particles.class_name.map(
        dict(zip(classes.name, classes.radius_angstrom / 20, strict=True))
    )
    assert ((particles.z - radius) >= 0.1 * 32 - 0.5).all() and (
        (particles.z + radius) <= 0.9 * 32
    ).all()
    assert ((particles.x - radius) >= 0).all() and ((particles.x + radius) <= 63).all()


def test_particles_do_not_overlap(simulated):
    classes = pd.read_csv(simulated / "classes.csv")
    particles = pd.read_csv(simulated / "particles.csv")
    radius = particles.class_name.map(
        dict(zip(classes.name, classes.radius_angstrom / 20, strict=True))
    ).to_numpy()
    centres = particles[["z", "y", "x"]].to_numpy()
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    np.fill_diagonal(distance, np.inf)
    assert (distance >= radius[:, None] + radius[None, :] - 1e-6).all()


def test_missing_wedge_holds_little_power(simulated):
    """Tilt axis Y, +-60°: Fourier directions within 30° of kz are (nearly) empty."""
    tomogram = _read(simulated / "tomograms" / "tomo_01.mrc").astype(np.float64)
    power = np.abs(np.fft.fftn(tomogram)) ** 2
    kz, ky, kx = np.meshgrid(*[np.fft.fftfreq(n) for n in tomogram.shape], indexing="ij")
    angle = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    radius = np.sqrt(kz**2 + ky**2 + kx**2)
    band = (radius > 0.05) & (radius < 0.45)
    inside = power[band & (angle > 70)].mean()
    outside = power[band & (angle < 50)].mean()
    assert inside < 0.05 * outside


def test_particles_are_dark_and_distinct_from_background(simulated):
    tomogram = _read(simulated / "tomograms" / "tomo_01.mrc")
    labels = _read(simulated / "labels" / "tomo_01.mrc").astype(np.uint8)
    assert tomogram.std() == pytest.approx(1.0, rel=1e-3)
    background = tomogram[labels == 0].mean()
    # The solid classes (globule, barrel, ribosome) are clearly darker than background.
    for label in (1, 2, 4):
        assert tomogram[labels == label].mean() < background - 0.3, label


def test_same_seed_same_files_other_seed_other_files(tmp_path, run_cli):
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        result = run_cli("simulate", tmp_path / name, *TINY, "--seed", seed, "--n-particles", "6")
        assert result.exit_code == 0, result.output
    for file in (
        "tomograms/tomo_01.mrc",
        "labels/tomo_01.mrc",
    ):  # (MRC headers hold a creation time)
        first, second = _read(tmp_path / "a" / file), _read(tmp_path / "b" / file)
        assert first.dtype == second.dtype and first.tobytes() == second.tobytes(), file
    for file in ("particles.csv", "classes.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert (tmp_path / "a" / "particles.csv").read_bytes() != (
        tmp_path / "c" / "particles.csv"
    ).read_bytes()
    assert len(pd.read_csv(tmp_path / "a" / "particles.csv")) == 6


# --- geometry ------------------------------------------------------------------------


def test_relion_matrix_matches_scipy_zyz_and_masks():
    from scipy.spatial.transform import Rotation

    from cryocaps.masks import relion_sampling_matrices

    angles = np.array([[10.0, 50.0, -70.0], [170.0, 120.0, 33.0], [-45.0, 5.0, 90.0]])
    matrices = relion_euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    np.testing.assert_allclose(
        matrices.transpose(0, 2, 1),
        Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix(),
        atol=1e-12,
    )
    # make-masks samples a template at (offset -> template) = A.T: the same convention.
    np.testing.assert_allclose(
        relion_sampling_matrices(angles), matrices.transpose(0, 2, 1), atol=1e-12
    )
    # RELION's Euler_angles2matrix for rot = 90°: x -> -y.
    np.testing.assert_allclose(relion_euler_to_matrix(90, 0, 0) @ [1, 0, 0], [0, -1, 0], atol=1e-12)


def _blob_cube(
    size: int, blobs: list[tuple[tuple[float, float, float], float]], sigma: float = 1.0
) -> np.ndarray:
    """Gaussian blobs at (x, y, z) offsets from the cube centre, with given masses (sigma in
    voxels)."""
    centre = (size - 1) / 2
    z, y, x = np.indices((size,) * 3) - centre
    cube = np.zeros((size,) * 3)
    for (bx, by, bz), mass in blobs:
        cube += mass * np.exp(-((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2) / (2.0 * sigma**2))
    return cube.astype(np.float32)


def test_rotated_asymmetric_particle_matches_its_angles():
    """A blob at p in the class density lands at A(rot, tilt, psi) @ p in the tomogram."""
    blobs = [((6.0, 0.0, 0.0), 1.0), ((0.0, 4.0, 0.0), 0.8), ((0.0, 0.0, -3.0), 0.6)]
    cube = _blob_cube(21, blobs)
    angles = np.array([[30.0, 70.0, -120.0], [-150.0, 20.0, 45.0]])
    rotated = rotate_density(cube, angles, np.zeros((2, 3)))
    for copy, angle in zip(rotated, angles, strict=True):
        matrix = relion_euler_to_matrix(*angle)
        expected = _blob_cube(21, [(tuple(matrix @ np.array(p)), m) for p, m in blobs])
        assert np.corrcoef(copy.ravel(), expected.ravel())[0, 1] > 0.99


def test_simulated_particle_is_its_class_density_rotated_by_its_angles():
    """End to end: render one asymmetric class and compare each particle with an independent
    rotation."""
    from scipy import ndimage

    from cryocaps.simulate.placement import render_particles

    cube = _blob_cube(21, [((6.0, 0.0, 0.0), 1.0), ((0.0, 4.0, 0.0), 0.8), ((0.0, 0.0, -3.0), 0.6)])
    template = ParticleTemplate("asym", cube, 10.0, 90.0)
    params = SimulationParameters(shape=(30, 30, 30), voxel_size_angstrom=10.0)
    centres = np.array([[14.3, 15.0, 14.6]])
    angles = np.array([[40.0, 110.0, -20.0]])
    volume, labels = render_particles(params, [template], centres, np.array([0]), angles)
    matrix = relion_euler_to_matrix(*angles[0])
    offsets = np.indices(volume.shape).reshape(3, -1).T - centres[0]  # zyx
    source = offsets[:, ::-1] @ matrix  # rows: A.T @ r (x, y, z)
    expected = ndimage.map_coordinates(cube, (source[:, ::-1] + 10).T, order=1).reshape(
        volume.shape
    )
    assert np.corrcoef(volume.ravel(), expected.ravel())[0, 1] > 0.98
    assert labels[14, 15, 15] == 1


def test_projector_and_reconstruction_geometry():
    """0° projects along z, 90° along x; a full ±90° series reconstructs the volume."""
    from scipy import ndimage

    volume = np.zeros((20, 24, 32), np.float32)
    for point in [(10, 12, 16), (4, 5, 25), (15, 20, 6)]:
        volume[point] = 1
    volume = ndimage.gaussian_filter(volume, 1.5)
    projections = project_tilt_series(volume, [0.0, 30.0, 90.0])
    np.testing.assert_allclose(projections[0], volume.sum(axis=0), atol=1e-5)
    side = np.zeros((24, 32), np.float32)
    side[:, 6:26] = volume.sum(
        axis=2
    ).T  # u = z at 90°: the z axis (20) centred on the detector (32)
    np.testing.assert_allclose(projections[2], side, atol=1e-5)
    # 30°: the point (z, x) = (10, 16) from centres (9.5, 15.5) appears at u = x cos + z sin
    u = 0.5 * np.cos(np.pi / 6) + 0.5 * np.sin(np.pi / 6) + 15.5
    assert abs(int(np.argmax(projections[1, 12])) - u) <= 1
    tilts = tilt_angles(90, 2)
    reconstruction = weighted_backprojection(project_tilt_series(volume, tilts), tilts, 20)
    assert np.corrcoef(reconstruction.ravel(), volume.ravel())[0, 1] > 0.99


def test_template_labels_follow_the_particle_shape():
    templates = builtin_templates(20.0, ["globule", "dumbbell"])
    params = SimulationParameters(shape=(32, 48, 48), voxel_size_angstrom=20.0, n_particles=4,
                                  label_shape="template", distractors=False)  # fmt: skip
    result = simulate_tomogram(templates, params, np.random.default_rng(1))
    spheres = SimulationParameters(**{**params.__dict__, "label_shape": "sphere"})
    sphere_result = simulate_tomogram(templates, spheres, np.random.default_rng(1))
    assert np.array_equal(
        result.particles[["x", "y", "z"]], sphere_result.particles[["x", "y", "z"]]
    )
    inside_template = result.labels > 0
    assert inside_template.sum() < 0.6 * (sphere_result.labels > 0).sum()
    assert (sphere_result.labels[inside_template] == result.labels[inside_template]).all()


# --- structures ------------------------------------------------------------------------

TINY_PDB = """\
HEADER    TEST
ATOM      1  CA  ALA A   1       0.000   0.000   0.000  1.00  0.00           C
ATOM      2  O   ALA A   1      20.000   0.000   0.000  1.00  0.00           O
HETATM    3  S   SO4 A   2       0.000  30.000  10.000  1.00  0.00           S
HETATM    4  O   HOH A   3      50.000  50.000  50.000  1.00  0.00           O
END
"""

TINY_CIF = """\
data_test
loop_
_atom_site.group_PDB
_atom_site.id
_atom_site.type_symbol
_atom_site.label_atom_id
_atom_site.Cartn_x
_atom_site.Cartn_y
_atom_site.Cartn_z
_atom_site.pdbx_PDB_model_num
ATOM 1 C CA 0.000 0.000 0.000 1
ATOM 2 O "O" 20.000 0.000 0.000 1
HETATM 3 S S 0.000 30.000 10.000 1
ATOM 4 C CA 99.0 99.0 99.0 2
#
"""


def test_pdb_atoms_become_density_at_the_right_voxels(tmp_path):
    path = tmp_path / "tiny.pdb.gz"
    path.write_bytes(gzip.compress(TINY_PDB.encode()))
    coords, numbers = read_atoms(path)
    assert coords.shape == (3, 3)  # the water is skipped
    np.testing.assert_array_equal(numbers, [6, 8, 16])
    density, origin = atoms_to_density(coords, numbers, 5.0)
    for (x, y, z), number in zip(coords, numbers, strict=True):
        voxel = np.round((np.array([z, y, x]) - origin[::-1]) / 5.0).astype(int)
        near = density[tuple(slice(v - 2, v + 3) for v in voxel)]
        assert np.unravel_index(np.argmax(near), near.shape) == (
            2,
            2,
            2,
        )  # peak on the atom's voxel
        # mass within 2 voxels is the atom's share of the total (by atomic number)
        assert near.sum() / density.sum() == pytest.approx(number / numbers.sum(), rel=0.02)
    assert density.sum() * 0.385 * 5.0**3 == pytest.approx(
        30.0, rel=1e-3
    )  # sum of Z, in protein units

    cif = tmp_path / "tiny.cif"
    cif.write_text(TINY_CIF)
    cif_coords, cif_numbers = read_atoms(cif)
    np.testing.assert_allclose(cif_coords, coords)
    np.testing.assert_array_equal(cif_numbers, numbers)


def test_structures_folder_with_model_and_map(tmp_path, run_cli):
    from cryocaps.structures import make_template

    folder = tmp_path / "structures"
    folder.mkdir()
    (folder / "tiny.pdb").write_text(TINY_PDB)
    # a map at 5 Å voxels of an off-centre blob: resampled to 10 Å and centred
    blob = _blob_cube(32, [((2.0, -1.0, 3.0), 1.0)], sigma=4.0)
    with mrcfile.new(tmp_path / "blob_5A.mrc") as mrc:
        mrc.set_data(blob)
        mrc.voxel_size = 5.0
    (folder / "blob_5A.mrc.gz").write_bytes(gzip.compress((tmp_path / "blob_5A.mrc").read_bytes()))
    templates = load_structure_templates(folder, 10.0)
    assert [t.name for t in templates] == ["blob", "tiny"]
    blob_template = templates[0]
    centre = (np.array(blob_template.density.shape) - 1) / 2
    from scipy import ndimage

    np.testing.assert_allclose(ndimage.center_of_mass(blob_template.density), centre, atol=0.05)
    assert blob_template.radius_angstrom == pytest.approx(
        make_template("b", blob, 5.0, "x").radius_angstrom, abs=10.0
    )
    out = tmp_path / "out"
    result = run_cli(
        "simulate",
        out,
        *TINY,
        "--structures",
        folder,
        "--classes-from",
        "tiny",
        "--n-particles",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(out / "classes.csv").name) == ["tiny"]
    assert set(pd.read_csv(out / "particles.csv").class_name) == {"tiny"}


def test_shared_shrec_structures(structures_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    result = run_cli("simulate", out, *TINY, "--structures", structures_dir,
                     "--classes-from", "3gl1,1bxn,4v4r", "--n-particles", "6")  # fmt: skip
    assert result.exit_code == 0, result.output
    classes = pd.read_csv(out / "classes.csv")
    radii = dict(zip(classes.name, classes.radius_angstrom, strict=True))
    assert list(classes.name) == ["3gl1", "1bxn", "4v4r"]
    assert 25 < radii["3gl1"] < 50 and 55 < radii["1bxn"] < 85 and 110 < radii["4v4r"] < 160


# --- errors ------------------------------------------------------------------------------


def _one_line_error(result) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(
    "arguments",
    [
        ["--snr", "0"],
        ["--snr", "-1"],
        ["--tilt-range-deg", "0"],
        ["--tilt-range-deg", "95"],
        [
            "--shape",
            "16,16,16",
            "--voxel-size-angstrom",
            "10",
        ],  # ribosome (~25 voxels) does not fit
        ["--shape", "64,64"],
        ["--classes-from", "nonesuch"],
        ["--n-tomograms", "0"],
        ["--crowding", "0.9"],
        ["--label-shape", "cube"],
    ],
)
def test_bad_values_exit_2_with_one_line(tmp_path, run_cli, arguments):
    _one_line_error(run_cli("simulate", tmp_path / "out", *arguments))
    assert not (tmp_path / "out" / "particles.csv").exists()


def test_bad_structures_folders_exit_2(tmp_path, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(run_cli("simulate", tmp_path / "o1", "--structures", empty))
    _one_line_error(run_cli("simulate", tmp_path / "o2", "--structures", tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "junk.mrc").write_bytes(b"not a map at all" * 10)
    (broken / "junk2.pdb").write_text("HEADER nothing here\nEND\n")
    result = run_cli("simulate", tmp_path / "o3", "--structures", broken)
    _one_line_error(result)
    assert "no readable" in result.output


def test_existing_outputs_need_overwrite(simulated, run_cli):
    result = run_cli("simulate", simulated, *TINY, "--seed", "3")
    _one_line_error(result)
    assert "--overwrite" in result.output


def test_full_tilt_range_and_no_particles(tmp_path, run_cli):
    """±90° (the near-90° tilts take the other projection path) and an empty sample both work."""
    result = run_cli("simulate", tmp_path / "out", *TINY, "--tilt-range-deg", "90",
                     "--tilt-step-deg", "10", "--n-particles", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    tomogram = _read(tmp_path / "out" / "tomograms" / "tomo_01.mrc")
    assert np.isfinite(tomogram).all() and tomogram.std() == pytest.approx(1.0, rel=1e-3)
    assert len(pd.read_csv(tmp_path / "out" / "particles.csv")) == 0


def test_ctf_is_dark_at_low_frequency_and_follows_the_defocus_gradient():
    from cryocaps.simulate import apply_ctf, ctf_2d

    params = SimulationParameters(voxel_size_angstrom=10.0)
    ctf = ctf_2d((64, 64), 10.0, params)
    assert ctf[0, 0] == pytest.approx(-params.amplitude_contrast, abs=1e-6)  # dark protein
    # first lobe (peak at chi = pi/2, k = 1/sqrt(2 lambda df) ~ 1/34 Å = index 19) negative too
    assert (ctf[0, :20] < 0).all() and ctf[0, 19] < -0.9
    images = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
    filtered = apply_ctf(images, [0.0, 30.0], params)
    single = np.fft.irfft2(np.fft.rfft2(images[0]) * ctf, s=(64, 64))
    np.testing.assert_allclose(filtered[0], single, atol=1e-5)
    # at 30° the last column is 31.5 voxels * 10 Å * tan 30° further from focus
    far = ctf_2d((64, 64), 10.0, params, params.defocus_um * 1e4 + 315.0 * np.tan(np.pi / 6))
    edge = np.fft.irfft2(np.fft.rfft2(images[1]) * far, s=(64, 64))
    np.testing.assert_allclose(filtered[1][:, -1], edge[:, -1], atol=1e-5)
    assert np.abs(filtered[1][:, 0] - edge[:, 0]).max() > 0.02  # the other side differs


def test_template_labels_agree_with_make_masks():
    """make-masks draws the same envelopes from the table's RELION angles: one angle convention."""
    from cryocaps.masks import Template, draw_templates

    templates = builtin_templates(20.0, ["barrel", "ribosome"])
    params = SimulationParameters(shape=(32, 56, 56), voxel_size_angstrom=20.0, n_particles=6,
                                  label_shape="template", distractors=False)  # fmt: skip
    result = simulate_tomogram(templates, params, np.random.default_rng(4))
    by_name = {
        t.name: (k + 1, Template(t.density, t.envelope_level)) for k, t in enumerate(templates)
    }
    table = result.particles
    drawn = draw_templates(
        params.shape,
        table[["z", "y", "x"]].to_numpy(float),
        np.array([by_name[n][0] for n in table.class_name]),
        [by_name[n][1] for n in table.class_name],
        table[["rot", "tilt", "psi"]].to_numpy(float),
    )
    either = (drawn > 0) | (result.labels > 0)
    assert either.sum() > 100
    assert (drawn == result.labels)[either].mean() > 0.98


def test_template_labels_are_picked_whole_at_the_defaults(tmp_path, run_cli):
    """simulate --label-shape template records each class's envelope volume in classes.csv,
    so cluster-picks' size limit expects envelopes (the dumbbell's is a tenth of its sphere)."""
    from cryocaps.evaluation import evaluate_picks
    from cryocaps.io.class_table import read_classes
    from cryocaps.io.particles import read_particles
    from cryocaps.io.volumes import read_tomogram

    out = tmp_path / "sim"
    result = run_cli(
        "simulate", out, *TINY, "--seed", "5", "--label-shape", "template", "--no-distractors"
    )
    assert result.exit_code == 0, result.output
    classes = read_classes(out / "classes.csv")
    for t in builtin_templates(20.0):
        assert classes.by_name(t.name).label_volume_angstrom3 == pytest.approx(
            t.envelope_volume_angstrom3, rel=1e-3
        )
    label_maps = [read_tomogram(p).data.view(np.uint8) for p in sorted(out.glob("labels/*.mrc"))]
    for particle_class in classes:
        share = sum(np.count_nonzero(m == particle_class.label) for m in label_maps) / sum(
            m.size for m in label_maps
        )
        assert particle_class.label_fraction == pytest.approx(share, rel=1e-3)
    dumbbell = classes.by_name("dumbbell")
    assert (
        dumbbell.label_volume_voxels(20.0)
        < 0.2 * 4 / 3 * np.pi * (dumbbell.radius_angstrom / 20) ** 3
    )
    labels = out / "labels" / "tomo_01.mrc"
    picked = run_cli(
        "cluster-picks", labels, "--classes", out / "classes.csv", "-o", tmp_path / "p.csv"
    )
    assert picked.exit_code == 0, picked.output
    picks = read_particles([tmp_path / "p.csv"], classes=classes).assign(tomo="tomo_01")
    truth = read_particles([out / "particles.csv"], classes=classes)
    scores = evaluate_picks(picks, truth, classes, 20.0)
    assert scores["classes"]["dumbbell"]["n_truth"] > 0
    for name, entry in scores["classes"].items():
        assert entry["recall"] >= 0.8, (name, entry)
