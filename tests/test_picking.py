"""cluster-picks: label maps made from particle lists give the particles back."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.errors import CryocapsError
from cryocaps.evaluation import evaluate_picks
from cryocaps.io.class_table import write_classes
from cryocaps.io.volumes import write_volume
from cryocaps.masks import draw_spheres
from cryocaps.picking import METHODS, pick, pick_particles, sphere_volume_voxels

VOXEL = 10.0
SHAPE = (36, 64, 64)


@pytest.fixture
def classes() -> ClassTable:
    # radii 3, 4.5 and 6 voxels at 10 Å
    return ClassTable(
        [
            ParticleClass(1, "small", 30.0),
            ParticleClass(2, "medium", 45.0),
            ParticleClass(3, "large", 60.0),
        ]
    )


def _particles(classes: ClassTable, touching: bool, seed: int = 0) -> pd.DataFrame:
    """Particles on a loose grid; with ``touching``, every other one has a partner touching it."""
    rng = np.random.default_rng(seed)
    names = classes.names
    radius = {name: classes.by_name(name).radius_angstrom / VOXEL for name in names}
    rows = []
    grid = [(z, y, x) for z in (9, 26) for y in (10, 32, 54) for x in (10, 32, 54)]
    for k, position in enumerate(grid):
        name = names[k % len(names)]
        centre = np.array(position) + rng.integers(-1, 2, 3)
        rows.append((name, *centre))
        if touching and k % 2 == 0:
            partner = names[(k + 1) % len(names)]
            # Partner along x or y at the sum of the radii (rounded): the spheres touch.
            offset = np.zeros(3, dtype=int)
            offset[2 if k % 4 == 0 else 1] = round(radius[name] + radius[partner])
            rows.append((partner, *(centre + offset)))
    table = pd.DataFrame(rows, columns=["class_name", "z", "y", "x"])
    table["tomo"] = "tomo_1"
    table["score"] = 1.0
    inside = np.all(
        (table[["z", "y", "x"]].to_numpy() >= 0) & (table[["z", "y", "x"]].to_numpy() < SHAPE),
        axis=1,
    )
    return table[inside].reset_index(drop=True)


def _label_map(table: pd.DataFrame, classes: ClassTable) -> np.ndarray:
    labels = [classes.by_name(n).label for n in table["class_name"]]
    radii = [classes.by_name(n).radius_angstrom / VOXEL for n in table["class_name"]]
    return draw_spheres(SHAPE, table[["z", "y", "x"]].to_numpy(float), labels, radii)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("touching", [False, True])
def test_perfect_maps_give_every_particle_back(classes, method, touching):
    truth = _particles(classes, touching)
    label_map = _label_map(truth, classes)
    picks = pick_particles(label_map, classes, VOXEL, method=method, tomo_name="tomo_1")
    scores = evaluate_picks(picks, truth, classes, VOXEL, tolerance_fraction=0.5)
    for name, entry in scores["classes"].items():
        assert entry["f1"] >= 0.95, (method, touching, name, entry)
    assert list(picks.columns[:6]) == ["tomo", "class_name", "x", "y", "z", "score"]
    assert (picks["tomo"] == "tomo_1").all()


def test_touching_particles_are_split_and_centred(classes):
    truth = _particles(classes, touching=True)
    assert len(truth) > 15
    picks = pick_particles(_label_map(truth, classes), classes, VOXEL, method="components")
    assert len(picks) == len(truth)
    for name in classes.names:
        # Particles cut by the volume's border have off-centre centroids: check the whole ones.
        radius = classes.by_name(name).radius_angstrom / VOXEL
        theirs = truth[truth["class_name"] == name][["z", "y", "x"]].to_numpy(float)
        whole = np.all((theirs >= radius) & (theirs <= np.array(SHAPE) - 1 - radius), axis=1)
        mine = picks[picks["class_name"] == name][["z", "y", "x"]].to_numpy()
        distances = np.linalg.norm(theirs[whole][:, None] - mine[None], axis=2).min(axis=1)
        assert whole.sum() >= 4 and distances.max() < 0.75, (name, distances)


def test_scores_are_mean_probability_or_size(classes):
    truth = pd.DataFrame(
        {"class_name": ["small", "large"], "z": [10, 20], "y": [15, 40], "x": [15, 40]}
    )
    label_map = _label_map(truth, classes)
    probabilities = np.zeros((4, *SHAPE), dtype=np.float16)
    probabilities[1][label_map == 1] = 0.75
    probabilities[3][label_map == 3] = 0.5
    with_probs = pick_particles(label_map, classes, VOXEL, probabilities)
    assert with_probs.set_index("class_name")["score"].to_dict() == pytest.approx(
        {"small": 0.75, "large": 0.5}
    )
    by_size = pick_particles(label_map, classes, VOXEL)
    sizes = {
        name: float(np.count_nonzero(label_map == classes.by_name(name).label))
        for name in ("small", "large")
    }
    assert by_size.set_index("class_name")["score"].to_dict() == sizes


def test_size_and_score_filters(classes):
    truth = pd.DataFrame({"class_name": ["large"], "z": [18], "y": [30], "x": [30]})
    label_map = _label_map(truth, classes)
    label_map[5, 5, 5:8] = 3  # a 3-voxel speck of the large class
    picks = pick_particles(label_map, classes, VOXEL, min_size_fraction=0.15)
    assert len(picks) == 1
    kept_speck = pick_particles(
        label_map, classes, VOXEL, min_size_fraction=0.0, relative_min_size=0.0
    )
    assert len(kept_speck) == 2
    # 3 voxels against a typical 905: the relative limit drops the speck by default
    assert len(pick_particles(label_map, classes, VOXEL, min_size_fraction=0.0)) == 1
    sphere = np.count_nonzero(label_map == 3) - 3
    assert sphere == pytest.approx(sphere_volume_voxels(6.0), rel=0.1)
    assert (
        len(pick_particles(label_map, classes, VOXEL, min_size_fraction=0.0, min_score=sphere + 1))
        == 0
    )


def test_noisy_segmentation_default_method(classes):
    """Speckle noise, eroded and fragmented particles, false blobs: still one pick per particle."""
    rng = np.random.default_rng(3)
    truth = _particles(classes, touching=True, seed=3)
    label_map = _label_map(truth, classes)
    # Ragged boundaries: flip a fifth of the surface voxels to background.
    from scipy import ndimage

    surface = (label_map > 0) & ~ndimage.binary_erosion(label_map > 0)
    label_map[surface & (rng.random(SHAPE) < 0.2)] = 0
    # Speckle of random classes over the background and a few small false blobs.
    speckle = rng.random(SHAPE) < 0.01
    label_map[speckle] = rng.integers(1, 4, speckle.sum())
    for z, y, x in rng.integers(4, 30, (4, 3)):
        label_map[z : z + 2, y : y + 2, x : x + 2] = 2
    picks = pick_particles(label_map, classes, VOXEL, tomo_name="tomo_1")
    scores = evaluate_picks(picks, truth, classes, VOXEL)
    assert scores["macro"]["f1"] >= 0.9, scores
    assert scores["micro"]["recall"] >= 0.95, scores


def test_int8_label_maps_and_unknown_labels(classes):
    truth = pd.DataFrame({"class_name": ["medium"], "z": [18], "y": [30], "x": [30]})
    label_map = _label_map(truth, classes).view(np.int8)  # as read back from MRC mode 0
    label_map = label_map.copy()
    label_map[2:6, 2:6, 2:6] = 9  # a label the class table does not know: ignored
    picks = pick_particles(label_map, classes, VOXEL)
    assert picks[["x", "y", "z"]].to_numpy().round().tolist() == [[30, 30, 18]]


def test_bad_arguments(classes):
    label_map = np.zeros(SHAPE, np.uint8)
    with pytest.raises(CryocapsError, match="--method"):
        pick_particles(label_map, classes, VOXEL, method="dbscan")
    with pytest.raises(CryocapsError, match="channels"):
        pick_particles(label_map, classes, VOXEL, np.zeros((2, *SHAPE), np.float16))
    with pytest.raises(CryocapsError, match="shape"):
        pick_particles(label_map, classes, VOXEL, np.zeros((4, 4, 4, 4), np.float16))
    empty = pick_particles(label_map, classes, VOXEL)
    assert empty.empty and list(empty.columns[:6]) == ["tomo", "class_name", "x", "y", "z", "score"]


# --- command line -------------------------------------------------------------


@pytest.fixture
def segmentation(tmp_path, classes):
    """OUT/<tomo>_labels.mrc + <tomo>_probs.mrc for two tomograms, classes.csv beside them."""
    folder = tmp_path / "seg"
    truths = []
    for k, tomo in enumerate(["TS_01", "TS_02"]):
        truth = _particles(classes, touching=True, seed=k)
        truth["tomo"] = tomo
        label_map = _label_map(truth, classes)
        probabilities = np.zeros((4, *SHAPE), dtype=np.float32)
        for label in range(4):
            probabilities[label] = np.where(label_map == label, 0.9, 0.1 / 3)
        write_volume(folder / f"{tomo}_labels.mrc", label_map, VOXEL, dtype="uint8")
        write_volume(folder / f"{tomo}_probs.mrc", probabilities, VOXEL, dtype="float16")
        truths.append(truth)
    write_classes(classes, folder / "classes.csv")
    return folder, pd.concat(truths, ignore_index=True)


def test_cli_relion5_output(run_cli, segmentation, classes, tmp_path):
    import starfile

    from cryocaps.io.particles import read_particles, tomogram_infos

    folder, truth = segmentation
    out = tmp_path / "picks" / "picks.star"
    result = run_cli("cluster-picks", folder, "-o", out)
    assert result.exit_code == 0, result.output
    assert "picks" in result.output and "large" in result.output
    star = starfile.read(out)
    particles = star["particles"] if isinstance(star, dict) else star
    for column in (
        "rlnTomoName",
        "rlnCenteredCoordinateXAngst",
        "rlnCenteredCoordinateZAngst",
        "rlnClassNumber",
    ):
        assert column in particles.columns
    assert set(particles["rlnTomoName"]) == {"TS_01", "TS_02"}
    assert (out.parent / "run.json").is_file()
    # The file round-trips to the right voxels and scores are the mean probability.
    infos = tomogram_infos(sorted(folder.glob("*_labels.mrc")))
    infos = [type(i)(i.name.removesuffix("_labels"), i.shape, i.voxel_size_angstrom) for i in infos]
    picks = read_particles(out, tomograms=infos, classes=classes)
    scores = evaluate_picks(picks, truth, classes, VOXEL)
    assert scores["micro"]["f1"] == 1.0
    assert picks["score"].to_numpy() == pytest.approx(0.9, abs=2e-3)


def test_cli_stopgap_and_methods(run_cli, segmentation, classes, tmp_path):
    from cryocaps.io.particles import read_particles

    folder, truth = segmentation
    out = tmp_path / "picks_stopgap.star"
    maps = sorted(folder.glob("*_labels.mrc"))
    result = run_cli(
        "cluster-picks",
        *maps,
        "-o",
        out,
        "--format",
        "stopgap",
        "--method",
        "meanshift",
        "--classes",
        folder / "classes.csv",
    )
    assert result.exit_code == 0, result.output
    assert "data_stopgap_motivelist" in out.read_text()
    picks = read_particles(out, classes=classes)
    assert len(picks) == len(truth)
    csv_out = tmp_path / "picks.csv"
    result = run_cli(
        "cluster-picks", *maps, "-o", csv_out, "--method", "peaks", "--no-probabilities",
        "--relative-min-size", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    picks = pd.read_csv(csv_out)
    assert len(picks) == len(truth)
    assert picks["score"].min() > 50  # sizes in voxels without probabilities
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["parameters"]["relative_min_size"] == 0
    assert run["parameters"]["min_size_fraction"] == 0.2


def test_cli_per_class_thresholds(run_cli, segmentation, classes, tmp_path):
    folder, truth = segmentation
    thresholds = tmp_path / "pick_thresholds.csv"
    # every pick scores 0.9: a 0.95 threshold drops one class, 0.5 keeps another, a blank keeps all
    first, second, *others = classes.names
    rows = [f"{first},0.95", f"{second},0.5", *(f"{name}," for name in others)]
    thresholds.write_text("class_name,min_score\n" + "\n".join(rows) + "\n")
    out = tmp_path / "picks.csv"
    result = run_cli("cluster-picks", folder, "-o", out, "--thresholds", thresholds)
    assert result.exit_code == 0, result.output
    picks = pd.read_csv(out)
    assert first not in set(picks["class_name"])
    assert len(picks) == (truth["class_name"] != first).sum()
    both = run_cli(
        "cluster-picks",
        folder,
        "-o",
        tmp_path / "x.csv",
        "--thresholds",
        thresholds,
        "--min-score",
        "1",
    )
    assert both.exit_code == 2 and "give one" in both.output


def test_cli_bad_inputs(run_cli, segmentation, tmp_path):
    folder, _ = segmentation
    label_path = folder / "TS_01_labels.mrc"
    out = tmp_path / "picks.csv"
    cases = [
        (["cluster-picks", folder / "TS_01_probs.mrc", "-o", out], "label map"),
        (["cluster-picks", label_path, "-o", out, "--method", "dbscan"], "--method"),
        (["cluster-picks", label_path, "-o", out, "--format", "pdb"], "--format"),
        (["cluster-picks", tmp_path / "missing.mrc", "-o", out], "missing.mrc"),
        (["cluster-picks", label_path, "-o", out, "--classes", tmp_path / "nope.csv"], "nope.csv"),
        (["cluster-picks", label_path, "-o", out, "--relative-min-size", "1.5"], "1.5"),
    ]
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "TS_09_labels.mrc").write_bytes(label_path.read_bytes())
    cases.append((["cluster-picks", lonely, "-o", out], "--classes"))
    for args, expected in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not out.exists()
    out.write_text("keep me")
    result = run_cli("cluster-picks", label_path, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert out.read_text() == "keep me"


def test_fragments_of_one_particle_give_one_pick(classes):
    truth = pd.DataFrame({"class_name": ["large"], "z": [18], "y": [30], "x": [30]})
    label_map = _label_map(truth, classes)
    label_map[:, :, 29] = 0  # a gap through the middle: two half-spheres
    label_map[:, 33, :] = 0  # and another: four quarters
    picks = pick_particles(label_map, classes, VOXEL, method="components")
    assert len(picks) == 1
    assert picks[["x", "y", "z"]].to_numpy()[0] == pytest.approx([30, 30, 18], abs=1.0)


def test_fragments_far_smaller_than_the_typical_pick_are_dropped(classes):
    """Background blobs above the sphere limit but a third the size of the segmented particles."""
    truth = pd.DataFrame(
        {"class_name": ["large"] * 3, "z": [10, 10, 26], "y": [12, 40, 26], "x": [12, 40, 52]}
    )
    label_map = _label_map(truth, classes)
    sphere = sphere_volume_voxels(6.0)  # the large class, 905 voxels
    for z, y, x in [(26, 12, 12), (26, 52, 12)]:
        label_map[z - 3 : z + 4, y - 3 : y + 4, x - 3 : x + 4] = 3  # 343 voxels = 0.38 sphere
    kept_all = pick_particles(label_map, classes, VOXEL, relative_min_size=0.0)
    assert len(kept_all) == 5 and kept_all["size_voxels"].min() == 343 > 0.2 * sphere
    picks = pick_particles(label_map, classes, VOXEL, tomo_name="t")
    truth["tomo"] = "t"
    scores = evaluate_picks(picks, truth, classes, VOXEL)
    assert scores["classes"]["large"]["precision"] == 1.0 == scores["classes"]["large"]["recall"]
    # alone in its map a blob is its own typical size: the sphere limit alone decides
    alone = np.zeros_like(label_map)
    alone[23:30, 9:16, 9:16] = 3
    assert len(pick_particles(alone, classes, VOXEL)) == 1
    with pytest.raises(CryocapsError, match="--relative-min-size"):
        pick_particles(label_map, classes, VOXEL, relative_min_size=1.0)


def test_class_table_is_found_beside_the_maps_or_one_folder_up(classes, tmp_path):
    from cryocaps.io.class_table import load_class_table_beside

    label_map = tmp_path / "run" / "seg" / "TS_01_labels.mrc"
    label_map.parent.mkdir(parents=True)
    with pytest.raises(CryocapsError, match="TS_01_labels.mrc"):
        load_class_table_beside([label_map], None, None)
    write_classes(classes, tmp_path / "run" / "classes.csv")
    table, path = load_class_table_beside([label_map], None, None)
    assert path == (tmp_path / "run" / "classes.csv").resolve() and table.names == classes.names
    # --radius-angstrom wins over a table beside the maps, and has no file
    table, path = load_class_table_beside([label_map], None, 30.0)
    assert (
        path is None and len(table) == 1 and table.by_name(table.names[0]).radius_angstrom == 30.0
    )


def test_cluster_picks_cli_defaults_are_the_librarys():
    # the command spells its defaults out (its module must not import the picking code, for a
    # fast --help); they must stay those of pick_particles, and its help must say them
    import inspect
    import typing

    from cryocaps.cli import cluster_picks
    from cryocaps.picking import pick

    parameters = inspect.signature(cluster_picks.command).parameters
    hints = typing.get_type_hints(cluster_picks.command, include_extras=True)
    # --method: none given means the model's per-class choice, else the library's default
    assert parameters["method"].default is None
    assert cluster_picks.DEFAULT_PICK_METHOD == pick.DEFAULT_METHOD
    assert f"else {pick.DEFAULT_METHOD}]" in hints["method"].__metadata__[0].help
    for option, constant in [
        ("min_size_fraction", pick.DEFAULT_MIN_SIZE_FRACTION),
        ("relative_min_size", pick.DEFAULT_RELATIVE_MIN_SIZE),
    ]:
        assert parameters[option].default == constant, option
        help_text = hints[option].__metadata__[0].help
        assert f"[default: {constant}]" in help_text, option


def test_size_limit_follows_the_label_volume_of_the_training_labels(classes, tmp_path):
    """Envelope-shaped picks (a tenth of the sphere) are kept where classes.csv records their
    label volume, and dropped by the sphere limit where it does not."""
    from cryocaps.io.class_table import read_classes

    envelope = np.zeros(SHAPE, dtype=np.uint8)
    for y in (12, 32, 52):  # three elongated 2 x 2 x 20 rods of the large class: 80 voxels
        envelope[17:19, y : y + 2, 22:42] = 3
    sphere = sphere_volume_voxels(6.0)
    assert 80 < 0.2 * sphere  # the sphere limit (181 voxels) drops them
    assert len(pick_particles(envelope, classes, VOXEL)) == 0
    rods = ClassTable(
        [
            c if c.name != "large" else ParticleClass(3, "large", 60.0, None, 80 * VOXEL**3)
            for c in classes
        ]
    )
    assert rods.by_name("large").label_volume_voxels(VOXEL) == pytest.approx(80)
    assert rods.by_name("small").label_volume_voxels(VOXEL) == pytest.approx(
        sphere_volume_voxels(3)
    )
    picks = pick_particles(envelope, rods, VOXEL)
    assert len(picks) == 3 and set(picks["size_voxels"]) == {80}
    # the column survives classes.csv (and classes without it keep the sphere)
    write_classes(rods, tmp_path / "classes.csv")
    frame = pd.read_csv(tmp_path / "classes.csv")
    assert frame["label_volume_angstrom3"].isna().tolist() == [True, True, False]
    again = read_classes(tmp_path / "classes.csv")
    assert [c.label_volume_angstrom3 for c in again] == [None, None, 80000.0]
    assert ClassTable.from_records(again.to_records()).by_name("large") == again.by_name("large")
    frame = frame.astype({"label_volume_angstrom3": object})
    frame.loc[2, "label_volume_angstrom3"] = "lots"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CryocapsError, match="bad.csv: bad label_volume_angstrom3"):
        read_classes(tmp_path / "bad.csv")
    frame.loc[2, "label_volume_angstrom3"] = -1
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CryocapsError, match="label_volume_angstrom3 -1.0; must be > 0"):
        read_classes(tmp_path / "bad.csv")


# --- size rules that a runaway class cannot swamp (issue 28) ------------------


def test_a_huge_blob_of_a_class_does_not_suppress_its_particle_sized_picks(classes):
    """A blob of 30 label volumes once set the class's typical size, so the real particles
    were dropped as fragments and the blob kept; now the blob is dropped and they stay."""
    truth = pd.DataFrame(
        {"class_name": ["large"] * 3, "z": [9, 9, 27], "y": [10, 54, 10], "x": [10, 10, 54]}
    )
    truth["tomo"] = "t"
    label_map = _label_map(truth, classes)
    label_map[4:34, 20:50, 20:50] = 3  # 27,000 voxels: 30 spheres of the class (905 voxels)
    before = pick_particles(
        label_map, classes, VOXEL, tomo_name="t", max_size_factor=1e6, relative_cap=1e6
    )  # the rule until 2026-12-07: every pick, the blob included, set the typical size
    assert len(before) == 1 and before["size_voxels"].iloc[0] == 27_000
    picks = pick_particles(label_map, classes, VOXEL, tomo_name="t")
    scores = evaluate_picks(picks, truth, classes, VOXEL)
    assert scores["classes"]["large"]["precision"] == 1.0 == scores["classes"]["large"]["recall"]
    # blobs of a few label volumes beside them cannot raise the size limit above them either:
    # the relative limit is capped at 0.75 V
    for z in (2, 20):
        label_map[z : z + 12, 3:15, 28:43] = 3  # 2,160 voxels: 2.4 label volumes
    uncapped = pick_particles(label_map, classes, VOXEL, tomo_name="t", relative_cap=1e6)
    assert set(uncapped["size_voxels"]) == {2160}  # half the 90th percentile: 1,080 > 905
    picks = pick_particles(label_map, classes, VOXEL, tomo_name="t")
    assert evaluate_picks(picks, truth, classes, VOXEL)["classes"]["large"]["recall"] == 1.0
    assert len(picks) == 5


def test_touching_spheres_of_one_class_are_split_near_their_centres(classes):
    centres = np.array([[18, 20, 20], [18, 20, 31], [18, 30, 26]], dtype=float)  # 10-11 apart
    label_map = draw_spheres(SHAPE, centres, [3, 3, 3], [6.0, 6.0, 6.0])
    assert ndimage_count(label_map == 3) == 1  # one component of ~2.6 label volumes
    for count in (2, 3):
        picks = pick_particles(
            np.where(_first_spheres(centres[:count]), label_map, 0), classes, VOXEL
        )
        assert len(picks) == count
        found = picks[["z", "y", "x"]].to_numpy()
        distances = np.linalg.norm(centres[:count, None] - found[None], axis=2).min(axis=1)
        assert distances.max() < 1.0, distances


def ndimage_count(mask: np.ndarray) -> int:
    from scipy import ndimage

    return ndimage.label(mask)[1]


def _first_spheres(centres: np.ndarray) -> np.ndarray:
    return draw_spheres(SHAPE, centres, [1] * len(centres), [6.0] * len(centres)) > 0


def test_a_blob_thicker_than_any_particle_gives_no_picks_but_touching_particles_do(classes):
    label_map = np.zeros(SHAPE, np.uint8)
    label_map[2:34, 4:40, 4:40] = 1  # the small class (radius 3: 113 voxels): 370 label volumes
    label_map[10:20, 20:30, 2] = 0  # not a plain box
    centres = np.array([[18, 43.0, 22.0], [18, 48.6, 22.0]])  # a pair touching the blob
    label_map = np.maximum(label_map, draw_spheres(SHAPE, centres, [1, 1], [3.0, 3.0]))
    assert ndimage_count(label_map == 1) == 1
    picks = pick_particles(label_map, classes, VOXEL)
    found = picks[["z", "y", "x"]].to_numpy()
    assert len(found) == 2  # the blob's inside is deeper than a particle's: no picks from it
    assert np.linalg.norm(found[:, None] - centres[None], axis=2).min(axis=0).max() < 1.5


def test_a_crowded_class_in_one_component_through_the_volume_is_picked_whole(classes):
    """Touching particles everywhere (a class filling a sixth of the tomogram, as crowded draws
    of the benchmark family do): one component of hundreds of label volumes, every particle
    picked."""
    grid = np.stack(np.meshgrid(*[np.arange(4, n - 3, 5.6) for n in SHAPE], indexing="ij"), -1)
    centres = grid.reshape(-1, 3)
    label_map = draw_spheres(SHAPE, centres, [1] * len(centres), [3.0] * len(centres))
    limits = pick.size_limits(classes.by_name("small"), VOXEL)
    assert ndimage_count(label_map == 1) == 1
    assert np.count_nonzero(label_map == 1) > 100 * limits.label_volume
    truth = pd.DataFrame(centres, columns=["z", "y", "x"]).assign(tomo="t", class_name="small")
    picks = pick_particles(label_map, classes, VOXEL, tomo_name="t")
    scores = evaluate_picks(picks, truth, classes, VOXEL)["classes"]["small"]
    assert scores["recall"] > 0.95 and scores["precision"] > 0.95


def test_budget_on_splits_keeps_wrong_maps_fast(classes, monkeypatch):
    """More components that could hold several particles than the budget: the rest are judged
    whole, with one warning."""
    from cryocaps.picking import methods

    monkeypatch.setattr(methods, "MAX_SPLITS", 2)
    pairs = [[9, y, x] for y in (10, 32, 54) for x in (10, 40)]
    centres = np.array([c for z, y, x in pairs for c in ([z, y, x], [z, y, x + 6])], float)
    label_map = draw_spheres(SHAPE, centres, [1] * len(centres), [3.0] * len(centres))
    limits = pick.size_limits(classes.by_name("small"), VOXEL)
    found = methods._pick_components(label_map == 1, 3.0, None, limits)
    assert found.split_skipped == 4 and len(found) == 2 * 2 + 4


def test_oversegmentation_warning_fires_on_a_runaway_map_only(classes, tmp_path, caplog):
    import logging

    from cryocaps.classes import oversegmented_classes
    from cryocaps.picking import pick_files

    truth = _particles(classes, touching=False)
    label_map = _label_map(truth, classes)
    counts = np.bincount(label_map.ravel(), minlength=4)
    trained = classes.with_label_fractions_from_counts(counts)  # the fractions of a right map
    assert trained.by_name("medium").label_fraction == pytest.approx(counts[2] / label_map.size)
    assert oversegmented_classes(trained, counts) == []
    runaway = label_map.copy()
    runaway[:, :20][runaway[:, :20] == 0] = 2  # background called "medium": 25% of the map
    found = oversegmented_classes(trained, np.bincount(runaway.ravel(), minlength=4))
    assert [f["name"] for f in found] == ["medium"] and found[0]["factor"] > 3
    write_volume(tmp_path / "good_labels.mrc", label_map, VOXEL, dtype="uint8")
    write_volume(tmp_path / "bad_labels.mrc", runaway, VOXEL, dtype="uint8")
    with caplog.at_level(logging.WARNING, logger="cryocaps"):
        pick_files([tmp_path / "good_labels.mrc"], trained)
        assert "over-segmentation" not in caplog.text
        pick_files([tmp_path / "bad_labels.mrc"], trained)
    lines = [r.getMessage() for r in caplog.records if "over-segmentation" in r.getMessage()]
    assert len(lines) == 1
    share = 100 * np.mean(runaway == 2)
    assert f"class medium covers {share:.1f}% of the tomogram" in lines[0]
    assert f"{100 * trained.by_name('medium').label_fraction:.2f}%" in lines[0]
    # a table without label fractions judges nothing
    assert oversegmented_classes(classes, np.bincount(runaway.ravel(), minlength=4)) == []


def test_label_fraction_round_trips_through_classes_csv_and_the_model(classes, tmp_path):
    from types import SimpleNamespace

    from cryocaps.io.class_table import read_classes
    from cryocaps.training.checkpoint import model_metadata

    table = classes.with_label_fractions({"small": 0.0123, "large": 0.2})
    write_classes(table, tmp_path / "classes.csv")
    again = read_classes(tmp_path / "classes.csv")
    assert [c.label_fraction for c in again] == [0.0123, None, 0.2]
    assert ClassTable.from_records(again.to_records()).by_name("small").label_fraction == 0.0123
    frame = pd.read_csv(tmp_path / "classes.csv")
    frame.loc[0, "label_fraction"] = 1.5
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CryocapsError, match="bad.csv: class 'small' has label_fraction 1.5"):
        read_classes(tmp_path / "bad.csv")
    # training records the fractions of its own label maps in the model's config
    data = SimpleNamespace(
        classes=classes,
        voxel_counts=np.array([900, 50, 0, 50]),
        unknown_voxels=0,
        volumes=[SimpleNamespace(voxel_size_angstrom=VOXEL)],
    )
    config = model_metadata(SimpleNamespace(patch_size=32), data, {})
    model_table = ClassTable.from_records(config["classes"])
    assert [c.label_fraction for c in model_table] == [0.05, None, 0.05]


def test_a_method_per_class(classes):
    truth = _particles(classes, touching=False)
    label_map = _label_map(truth, classes)
    mixed = pick_particles(label_map, classes, VOXEL, method={"large": "meanshift"})
    for name, method in (("small", "components"), ("medium", "components"), ("large", "meanshift")):
        alone = pick_particles(label_map, classes, VOXEL, method=method)
        columns = ["class_name", "x", "y", "z"]
        expected = alone[alone["class_name"] == name][columns].reset_index(drop=True)
        got = mixed[mixed["class_name"] == name][columns].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
    with pytest.raises(CryocapsError, match="--method 'magic'"):
        pick_particles(label_map, classes, VOXEL, method={"large": "magic"})


@pytest.mark.parametrize("method", ["components", "meanshift"])
def test_picks_scored_by_size_are_those_picked_without_weights(classes, method):
    """Validation picks once and scores twice: the weights change no pick, only its score."""
    from cryocaps.picking import scored_by_size

    truth = _particles(classes, touching=True)
    label_map = _label_map(truth, classes)
    weights = np.random.default_rng(0).random(label_map.shape).astype(np.float32)
    weighted = pick_particles(label_map, classes, VOXEL, scores=weights, method=method)
    plain = pick_particles(label_map, classes, VOXEL, method=method)
    derived = scored_by_size(weighted, classes)
    key = ["class_name", "z", "y", "x"]
    pd.testing.assert_frame_equal(
        derived.sort_values(key).reset_index(drop=True),
        plain.sort_values(key).reset_index(drop=True),
    )
    assert list(derived["class_name"]) == list(plain["class_name"])  # pick_particles' order
    assert (np.diff(derived["score"].to_numpy())[derived["class_name"].iloc[1:].to_numpy()
            == derived["class_name"].iloc[:-1].to_numpy()] <= 0).all()  # fmt: skip
