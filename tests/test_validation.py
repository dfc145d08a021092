"""Validation on held-out regions: never sampled for training, scored at particle level, its
thresholds kept in the model, written beside segment's maps and used by cluster-picks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_training import TINY_OPTIONS, VOXEL, _config, _make_dataset

from cryocaps.io.volumes import write_volume


@pytest.fixture
def dataset(tmp_path) -> Path:
    return _make_dataset(tmp_path / "data")


def _training_box(data, view: int, corner, patch: int) -> tuple[list[int], list[int]]:
    """A patch at ``corner`` of training view ``view``, as [low, high) voxels of its volume."""
    _, offset = data.holdout.view_sources[view]
    low = [c + o for c, o in zip(corner, offset, strict=True)]
    return low, [v + patch for v in low]


@pytest.mark.parametrize("fold", [None, "1/3"])  # 1/3: the training view starts at y 21
def test_no_training_patch_reaches_a_held_out_region_or_its_margin(dataset, tmp_path, fold):
    from cryocaps.training import prepare_data
    from cryocaps.training.data import training_sampler

    patch = 16
    config = _config(
        dataset,
        tmp_path / "o",
        patch_size=patch,
        fold=fold,
        background_fraction=0.5,
        hard_negative_fraction=0.5,
        jitter_voxels=8,  # up to half a patch
        rot90=True,
        mirror=True,
    )
    data = prepare_data(config)
    margin = patch // 2
    forbidden = []  # (volume, low, high) of every region's box grown by the margin
    for region in data.holdout.regions:
        shape = data.volumes[region.volume].shape
        low = [max(0, s.start - margin) for s in region.box]
        high = [min(n, s.stop + margin) for s, n in zip(region.box, shape, strict=True)]
        forbidden.append((region.volume, low, high))
        assert region.box[0] == slice(0, shape[0])  # full Z
    sampler = training_sampler(data, config, [config.seed, 0])
    for _ in range(3000):
        view, corner = sampler.next_location()
        volume = data.holdout.view_sources[view][0]
        low, high = _training_box(data, view, corner, patch)
        assert all(
            0 <= a and b <= n for a, b, n in zip(low, high, data.volumes[volume].shape, strict=True)
        )
        for region_volume, r_low, r_high in forbidden:
            overlaps = all(
                a < rh and b > rl for a, b, rl, rh in zip(low, high, r_low, r_high, strict=True)
            )
            assert not (region_volume == volume and overlaps), (volume, low, r_low, r_high)
    # and the patches themselves come from those views (memory shared with the volume)
    images, labels = sampler.sample(4)
    assert images.shape == (4, 1, patch, patch, patch)
    for view, (volume, _) in zip(data.train_views, data.holdout.view_sources, strict=True):
        assert np.shares_memory(view.label_map, data.volumes[volume].label_map)
    # every validation particle lies in a region's box
    for v, zyx in zip(data.val_particles.volume, data.val_particles.zyx, strict=True):
        assert any(
            r.volume == v and all(s.start <= c < s.stop for s, c in zip(r.box, zyx, strict=True))
            for r in data.holdout.regions
        )


def test_training_particles_are_mapped_back_to_their_volumes_voxels(dataset, tmp_path):
    """Fold 1/3 cuts training views that start inside their volume (at y 21): each training
    particle, mapped back, sits at the centre of its own label in the volume's map."""
    from cryocaps.training import prepare_data

    data = prepare_data(_config(dataset, tmp_path / "o", fold="1/3"))
    assert any(offset != (0, 0, 0) for _, offset in data.holdout.view_sources)
    found = 0
    for index, volume in enumerate(data.volumes):
        zyx, labels = data.holdout.training_particles_in(index)
        label_map = np.asarray(volume.label_map).view(np.uint8)
        assert np.array_equal(label_map[tuple(zyx.T)], labels)
        found += len(zyx)
    assert found == len(data.train_particles) > 0


def test_slab_is_the_last_fraction_of_the_longer_in_plane_axis(dataset, tmp_path):
    from cryocaps.training import prepare_data

    data = prepare_data(_config(dataset, tmp_path / "o", patch_size=16))
    for region in data.holdout.regions:
        # 40 x 40 in-plane: Y; 0.17 x 40 = 7 voxels, raised to 8 (half a patch: the validation
        # patches with the 8-voxel margin must fit)
        assert region.box == (slice(0, 24), slice(32, 40), slice(0, 40))
        assert region.context == (slice(0, 24), slice(24, 40), slice(0, 40))
    assert [v.shape for v in data.train_views] == [(24, 24, 40)] * 2
    whole = prepare_data(_config(dataset, tmp_path / "o", val_tomograms=["tomo_1"]))
    assert [r.name for r in whole.holdout.regions] == ["tomo_1"]
    assert whole.holdout.regions[0].box == (slice(0, 24), slice(0, 40), slice(0, 40))
    assert [v.shape for v in whole.train_views] == [(24, 40, 40)]


def test_a_tomogram_too_small_for_a_slab_is_refused(dataset, tmp_path):
    from cryocaps.errors import CryocapsError
    from cryocaps.training import prepare_data

    with pytest.raises(CryocapsError, match="too small to hold out"):
        prepare_data(_config(dataset, tmp_path / "o", patch_size=24, val_fraction=0.5))
    with pytest.raises(CryocapsError, match="thinner than a patch"):
        prepare_data(_config(dataset, tmp_path / "o", patch_size=16, fold="10/10"))


def test_region_cap_keeps_slabs_in_fewer_tomograms_then_crops(dataset, tmp_path):
    from cryocaps.training import prepare_data

    # each slab's context is 24 x 16 x 40 = 15,360 voxels: one of the two fits in 20,000
    data = prepare_data(_config(dataset, tmp_path / "o", patch_size=16, max_val_voxels=20_000))
    assert [r.name for r in data.holdout.regions] == ["tomo_0"]
    assert data.holdout.regions[0].context == (slice(0, 24), slice(24, 40), slice(0, 40))
    assert [v.shape for v in data.train_views] == [(24, 24, 40), (24, 40, 40)]  # tomo_1 whole
    assert "the 1 of 2 tomograms' (tomo_0)" in data.holdout.description
    # below one slab: that slab is cropped along X, centred
    data = prepare_data(_config(dataset, tmp_path / "o", patch_size=16, max_val_voxels=10_000))
    (region,) = data.holdout.regions
    assert region.context[2] == slice(7, 33)  # X: 26 of 40 voxels, centred
    assert region.box[2] == slice(15, 25)  # inside by the margin: context only beyond
    assert region.box[1] == slice(32, 40)  # the slab itself is kept
    assert math.prod(region.context_shape) <= 10_000
    assert len(data.val_particles) and (data.val_particles.zyx[:, 2] == 20).all()


def test_background_share_and_scores_of_a_region(dataset, tmp_path):
    """A map that calls the whole region 'large': every background voxel goes to that class."""
    from cryocaps.training import prepare_data
    from cryocaps.training.regions import region_outcome, score_outcomes

    data = prepare_data(_config(dataset, tmp_path / "o", patch_size=16))
    outcomes = []
    for region in data.holdout.regions:
        volume = data.volumes[region.volume]
        truth = np.asarray(volume.label_map[region.context]).view(np.uint8)
        labels = np.where(truth > 0, truth, 2).astype(np.uint8)  # particles right, rest "large"
        score = np.where(truth > 0, 0.9, 0.6).astype(np.float16)
        outcomes.append(
            region_outcome(labels, score, volume, region, data.val_particles, data.classes)
        )
    metrics, thresholds = score_outcomes(outcomes, data.classes)
    assert metrics["val_background_share_large"] == 1.0
    assert metrics["val_background_share_small"] == 0.0
    assert metrics["val_background_share"] == 1.0
    # the small particles are found exactly; large ones drown in one region-sized blob
    n_small = int((data.val_particles.label == 1).sum())
    if n_small:
        assert metrics["val_recall_small"] == 1.0 and metrics["val_precision_small"] == 1.0
    assert metrics["val_precision_large"] < 1.0
    assert set(thresholds) == {"probability", "size_voxels"}
    assert [row["class_name"] for row in thresholds["probability"]] == ["small", "large"]


def _false_blob(data):
    """The first held-out region, its volume and annotation (context), and a 'small' blob
    (radius 3) centred on a voxel of the scored box at least 7 voxels from every particle:
    ``(region, volume, truth, centre, blob mask)``."""
    from scipy import ndimage

    region = data.holdout.regions[0]
    volume = data.volumes[region.volume]
    truth = np.asarray(volume.label_map[region.context]).view(np.uint8)
    clear = ndimage.distance_transform_edt(truth == 0) >= 7
    inside = np.zeros_like(clear)
    inside[region.box_in_context] = True
    centre = np.argwhere(clear & inside)[0]
    zz, yy, xx = np.indices(truth.shape)
    blob = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= 9
    return region, volume, truth, centre, blob


def _scored_false_blob(dataset, tmp_path):
    """:func:`_false_blob`'s blob as a 'small' label scored 0.6 beside particles scored 0.9:
    ``(data, region, volume, labels, score, centre)`` (skips without a held-out small one)."""
    from cryocaps.training import prepare_data

    data = prepare_data(_config(dataset, tmp_path / "o", patch_size=16))
    if not (data.val_particles.label == 1).any():
        pytest.skip("no small particle held out")
    region, volume, truth, centre, blob = _false_blob(data)
    labels = np.where(blob, 1, truth).astype(np.uint8)
    score = np.where(blob, 0.6, np.where(truth > 0, 0.9, 0.1)).astype(np.float16)
    return data, region, volume, labels, score, centre


def _far_corner(region, centre) -> tuple[int, int, int]:
    """The corner voxel of the region's scored box farthest from ``centre`` (context voxels)."""
    corners = [
        tuple(b.start if k & (1 << axis) else b.stop - 1 for axis, b in enumerate(region.box))
        for k in range(8)
    ]
    in_context = np.array(corners) - [s.start for s in region.context]
    return corners[int(np.argmax(((in_context - centre) ** 2).sum(1)))]


def test_a_pick_on_unknown_annotation_is_neither_true_nor_false(dataset, tmp_path):
    """Partial annotations: a 'small' blob on empty background is a false pick, but where the
    annotation says unknown (a particle nobody annotated, maybe) it is not scored at all."""
    import dataclasses

    from cryocaps.classes import IGNORE_LABEL
    from cryocaps.training import prepare_data
    from cryocaps.training.regions import region_outcome, score_outcomes

    data = prepare_data(_config(dataset, tmp_path / "o", patch_size=16))
    region, volume, truth, centre, blob = _false_blob(data)
    labels = np.where(blob, 1, truth).astype(np.uint8)
    score = np.where(labels > 0, 0.9, 0.1).astype(np.float16)

    def scored(label_map):
        changed = dataclasses.replace(volume, label_map=label_map)
        outcome = region_outcome(labels, score, changed, region, data.val_particles, data.classes)
        return score_outcomes([outcome], data.classes)[0]

    empty = scored(np.asarray(volume.label_map).view(np.uint8))
    unknown_map = np.asarray(volume.label_map).view(np.uint8).copy()
    context_view = unknown_map[region.context]
    context_view[blob] = IGNORE_LABEL  # the blob's place is not annotated
    unknown = scored(unknown_map)
    assert empty["val_picks"] == unknown["val_picks"] + 1
    assert empty["val_background_share_small"] > 0 and unknown["val_background_share_small"] == 0
    if (data.val_particles.label == 1).any():
        assert empty["val_precision_small"] < 1.0 and unknown["val_precision_small"] == 1.0


def test_partial_annotation_sets_no_score_threshold(dataset, tmp_path):
    """A false 'small' blob on empty background, scored lower than the particles: on complete
    annotation a probability threshold between the two scores removes it; where the annotation
    has unknown voxels (partial), precision is a lower bound and no threshold is set."""
    import dataclasses

    from cryocaps.classes import IGNORE_LABEL
    from cryocaps.training.regions import PARTIAL_THRESHOLDS, region_outcome, score_outcomes

    data, region, volume, labels, score, centre = _scored_false_blob(dataset, tmp_path)

    def thresholds(label_map):
        changed = dataclasses.replace(volume, label_map=label_map)
        outcome = region_outcome(labels, score, changed, region, data.val_particles, data.classes)
        return score_outcomes([outcome], data.classes)[1]

    complete = thresholds(np.asarray(volume.label_map).view(np.uint8))
    small = {r["class_name"]: r for r in complete["probability"]}["small"]
    assert 0.6 < small["min_score"] < 0.9 and "not_set" not in complete
    partial_map = np.asarray(volume.label_map).view(np.uint8).copy()
    partial_map[_far_corner(region, centre)] = IGNORE_LABEL  # one unknown voxel of the box
    partial = thresholds(partial_map)
    assert partial["not_set"] == PARTIAL_THRESHOLDS
    for kind in ("probability", "size_voxels"):
        assert all(r["min_score"] is None for r in partial[kind])
        assert [r["method"] for r in partial[kind]] == [r["method"] for r in complete[kind]]
    small = {r["class_name"]: r for r in partial["probability"]}["small"]
    assert small["f1"] == small["f1_keep_all"] and small["precision"] < 1.0
    assert 0.6 < small["withheld_min_score"] < 0.9  # recorded, not applied


def test_only_the_partly_annotated_classes_lose_their_thresholds(dataset, tmp_path):
    """--unannotated auto names the partly annotated classes: with unknown voxels in the held-out
    annotation, 'large' (named) loses its threshold, 'small' (complete) keeps the one that
    removes its false blob."""
    import dataclasses

    from cryocaps.classes import IGNORE_LABEL
    from cryocaps.training.regions import region_outcome, score_outcomes

    data, region, volume, labels, score, centre = _scored_false_blob(dataset, tmp_path)
    partial_map = np.asarray(volume.label_map).view(np.uint8).copy()
    partial_map[_far_corner(region, centre)] = IGNORE_LABEL  # one unknown voxel of the box
    changed = dataclasses.replace(volume, label_map=partial_map)
    outcome = region_outcome(labels, score, changed, region, data.val_particles, data.classes)
    thresholds = score_outcomes([outcome], data.classes, partial_classes={"large"})[1]
    rows = {r["class_name"]: r for r in thresholds["probability"]}
    assert 0.6 < rows["small"]["min_score"] < 0.9
    assert rows.get("large", {"min_score": None})["min_score"] is None
    assert "large" in thresholds["not_set"] and "small" not in thresholds["not_set"]


def test_patch_dice_does_not_score_unknown_voxels():
    """A network that calls everything class 1: where the annotation is unknown, that costs
    nothing; where it says background, it does."""
    import contextlib

    import torch

    from cryocaps.classes import IGNORE_LABEL
    from cryocaps.runtime import Distributed
    from cryocaps.training.ranks import Ranks
    from cryocaps.training.sampling import TrainingVolume
    from cryocaps.training.validation import validate

    class AlwaysOne(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([0.0, 1.0]))

        def forward(self, images):
            return self.bias.view(1, 2, 1, 1, 1).expand(len(images), 2, *images.shape[2:])

        def compute_loss(self, images, labels, class_weights):
            return self.forward(images).sum() * 0, {}

    label_map = np.zeros((8, 8, 8), np.uint8)
    label_map[:4] = 1  # half the patch class 1, half background
    stats = {"low": -1.0, "high": 1.0, "mean": 0.0, "std": 1.0}
    volume = TrainingVolume("t", np.zeros((8, 8, 8), np.float32), label_map, stats, 10.0)
    run = dict(patch_size=8, batch_size=1, class_weights=None, device="cpu",
               autocast=contextlib.nullcontext, ranks=Ranks(Distributed()), n_labels=2)  # fmt: skip
    _, dice = validate(AlwaysOne(), [(0, (0, 0, 0))], [volume], **run)
    assert dice[1] == pytest.approx(2 / 3)  # 256 right of 512 called
    label_map[4:] = IGNORE_LABEL  # the rest unknown: not scored
    _, dice = validate(AlwaysOne(), [(0, (0, 0, 0))], [volume], **run)
    assert dice[1] == pytest.approx(1.0)


@pytest.mark.slow
def test_a_short_run_records_validation_scores_and_thresholds(dataset, tmp_path):
    from cryocaps.training import train

    result = train(_config(dataset, tmp_path / "run", epochs=3, steps_per_epoch=2, val_every=2))
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    for name in ("small", "large"):
        for key in ("precision", "recall", "f1", "background_share"):
            assert f"val_{key}_{name}" in metrics
    # validated every 2 epochs and at the last: 2 and 3
    assert metrics["val_macro_f1"].notna().tolist() == [False, True, True]
    validated = metrics.dropna(subset=["val_macro_f1"])
    assert validated[["val_macro_f1", "val_background_share"]].stack().between(0, 1).all()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    saved = config["pick_thresholds"]
    assert saved["epoch"] == result["best_epoch"] == config["training"]["epoch"]
    assert result["best_epoch"] in (2, 3)  # the best is chosen among validated epochs
    for kind in ("probability", "size_voxels"):
        assert [row["class_name"] for row in saved[kind]] == ["small", "large"]
        assert saved[kind] == result["pick_thresholds"][kind]
    assert result["validation"]["region_validations"] == 2
    assert 0 < result["validation"]["time_share"] < 1
    assert config["training"]["validation"]["val_macro_f1"] == pytest.approx(
        float(metrics.loc[metrics["epoch"] == result["best_epoch"], "val_macro_f1"].iloc[0])
    )


# --- segment and cluster-picks: the thresholds travel with the model -------------------


def _model_with_thresholds(folder: Path) -> Path:
    from cryocaps.modelfile import save_model
    from cryocaps.models import create_model

    row = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "f1_keep_all": 0.5, "n_picks": 2}
    thresholds = {
        "calibrated_on": "a test",
        "epoch": 1,
        "probability": [
            {"class_name": "small", "min_score": 0.7, **row},
            {"class_name": "large", "min_score": None, **row},
        ],
        "size_voxels": [
            {"class_name": "small", "min_score": 150.0, **row},
            {"class_name": "large", "min_score": None, **row},
        ],
    }
    metadata = {
        "classes": [
            {"label": 1, "name": "small", "radius_angstrom": 30.0},
            {"label": 2, "name": "large", "radius_angstrom": 50.0},
        ],
        "voxel_size_angstrom": VOXEL,
        "patch_size": 16,
        "pick_thresholds": thresholds,
    }
    return save_model(folder, create_model("unet", 3, **TINY_OPTIONS), metadata)


def test_segment_writes_the_models_thresholds_beside_its_maps(dataset, tmp_path, run_cli):
    from cryocaps.classes import ClassTable
    from cryocaps.io.thresholds import read_score_thresholds

    model = _model_with_thresholds(tmp_path / "model")
    out = tmp_path / "seg"
    tomogram = dataset / "tomograms" / "tomo_0.mrc"
    result = run_cli("segment", tomogram, "--model", model, "-o", out, "--threads", "1")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "pick_thresholds.csv")
    assert set(table["score"]) == {"probability", "size_voxels"}
    classes = ClassTable.from_records(json.loads((model / "config.json").read_text())["classes"])
    path = out / "pick_thresholds.csv"
    assert read_score_thresholds(path, classes, "probability") == {"small": 0.7}
    assert read_score_thresholds(path, classes, "size_voxels") == {"small": 150.0}
    run = json.loads((out / "run.json").read_text())
    assert str(out / "pick_thresholds.csv") in json.dumps(run["outputs"])


def _two_blobs(folder: Path) -> tuple[Path, list[int]]:
    """A label map with two 'small' particles (radius 3 voxels) segmented at two sizes."""
    folder.mkdir(parents=True)
    zz, yy, xx = np.indices((24, 40, 40))
    label_map = np.zeros((24, 40, 40), np.uint8)
    sizes = []
    for centre, radius in (((12, 10, 10), 3.0), ((12, 28, 28), 3.5)):
        inside = (
            sum((axis - c) ** 2 for axis, c in zip((zz, yy, xx), centre, strict=True)) <= radius**2
        )
        label_map[inside] = 1
        sizes.append(int(inside.sum()))
    path = folder / "tomo_0_labels.mrc"
    write_volume(path, label_map, VOXEL, dtype="uint8")
    (folder / "classes.csv").write_text("label,name,radius_angstrom\n1,small,30\n2,large,50\n")
    return path, sizes


def test_cluster_picks_uses_the_thresholds_beside_the_maps_by_default(tmp_path, run_cli):
    from cryocaps.io.thresholds import write_companion_thresholds

    label_path, sizes = _two_blobs(tmp_path / "seg")
    between = sum(sizes) / 2
    row = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "f1_keep_all": 0.5, "n_picks": 2}
    write_companion_thresholds(
        {
            "probability": [{"class_name": "small", "min_score": 0.99, **row}],
            # no probability map beside the labels: a pick's score is its size in voxels
            "size_voxels": [{"class_name": "small", "min_score": between, **row}],
        },
        tmp_path / "seg",
    )

    def picks(*extra):
        out = tmp_path / f"picks{len(extra)}.csv"
        result = run_cli("cluster-picks", label_path, "-o", out, "--overwrite", *extra)
        assert result.exit_code == 0, result.output
        return pd.read_csv(out), result.output

    default, output = picks()
    assert "score thresholds for size voxels scores from" in " ".join(output.split())
    assert default["score"].tolist() == [max(sizes)]  # the low-scoring pick is dropped
    without, _ = picks("--thresholds", "none")
    assert sorted(without["score"]) == sorted(sizes)
    given, _ = picks("--min-score", "1")  # an explicit threshold replaces the companion
    assert len(given) == 2


def test_validation_chooses_each_classs_picking_method_by_its_best_f1():
    """Per score kind and class, the method whose best-threshold F1 is higher; ties go to
    components; a class no method scored falls back to components for the metrics."""
    from cryocaps.classes import ClassTable, ParticleClass
    from cryocaps.training.regions import PICK_METHODS, _choose_methods

    classes = ClassTable([ParticleClass(1, "a", 30.0), ParticleClass(2, "b", 50.0),
                          ParticleClass(3, "c", 50.0), ParticleClass(4, "d", 50.0)])  # fmt: skip

    def table(f1s: dict) -> pd.DataFrame:
        rows = [{"class_name": n, "min_score": 0.5, "precision": f, "recall": f, "f1": f,
                 "f1_keep_all": f, "n_picks": 3} for n, f in f1s.items()]  # fmt: skip
        return pd.DataFrame(rows).set_index("class_name", drop=False)

    tables = {
        ("components", "probability"): table({"a": 0.9, "b": 0.2, "d": float("nan")}),
        ("meanshift", "probability"): table({"a": 0.9, "b": 0.6, "d": 0.0}),
        ("components", "size_voxels"): table({"a": 0.5, "b": 0.7}),
        ("meanshift", "size_voxels"): table({"a": 0.8, "b": float("nan")}),
    }
    thresholds, chosen = _choose_methods(tables, classes)
    assert PICK_METHODS[0] == "components"
    # d: no picks by components (NaN) against F1 0 by mean shift is a tie, not a win
    assert chosen == {"a": "components", "b": "meanshift", "c": "components", "d": "components"}
    by_kind = {k: {r["class_name"]: r["method"] for r in rows} for k, rows in thresholds.items()}
    assert by_kind == {"probability": {"a": "components", "b": "meanshift", "d": "components"},
                       "size_voxels": {"a": "meanshift", "b": "components"}}  # fmt: skip
    assert (
        thresholds["probability"][1]["f1"] == 0.6 and thresholds["probability"][1]["n_picks"] == 3
    )


def test_a_class_picked_without_threshold_gets_the_method_whose_every_pick_scores_best():
    """Components win on best-threshold F1 but keep-all F1 (no threshold) favours mean shift:
    a class whose threshold is dropped (partial annotation) takes mean shift, the others keep
    the best-threshold choice."""
    from cryocaps.classes import ClassTable, ParticleClass
    from cryocaps.training.regions import _choose_methods

    classes = ClassTable([ParticleClass(1, "ring", 50.0), ParticleClass(2, "ball", 50.0)])

    def table(f1: float, keep_all: float) -> pd.DataFrame:
        rows = [{"class_name": n, "min_score": 900.0, "precision": f1, "recall": f1, "f1": f1,
                 "f1_keep_all": keep_all, "n_picks": 9} for n in ("ring", "ball")]  # fmt: skip
        return pd.DataFrame(rows).set_index("class_name", drop=False)

    tables = {
        (method, kind): table(*scores)
        for method, scores in (("components", (0.6, 0.05)), ("meanshift", (0.5, 0.45)))
        for kind in ("probability", "size_voxels")
    }
    assert _choose_methods(tables, classes)[1] == {"ring": "components", "ball": "components"}
    thresholds, chosen = _choose_methods(tables, classes, {"ring"})
    assert chosen == {"ring": "meanshift", "ball": "components"}
    assert {r["class_name"]: r["method"] for r in thresholds["size_voxels"]} == chosen


def test_cluster_picks_uses_the_method_training_chose_per_class(tmp_path, run_cli):
    from cryocaps.io.thresholds import write_companion_thresholds

    label_path, _ = _two_blobs(tmp_path / "seg")
    row = {"min_score": None, "precision": 1.0, "recall": 1.0, "f1": 1.0, "f1_keep_all": 1.0,
           "n_picks": 2}  # fmt: skip
    write_companion_thresholds(
        {
            "probability": [{"class_name": "small", "method": "components", **row}],
            "size_voxels": [{"class_name": "small", "method": "meanshift", **row}],
        },
        tmp_path / "seg",
    )
    assert "method" in (tmp_path / "seg" / "pick_thresholds.csv").read_text()

    def run(*extra):
        out = tmp_path / f"picks{len(extra)}.csv"
        result = run_cli("cluster-picks", label_path, "-o", out, "--overwrite", *extra)
        return result, out

    result, out = run()
    assert result.exit_code == 0, result.output
    assert "picking methods from" in " ".join(result.output.split())
    run_json = json.loads((out.parent / "run.json").read_text())
    assert run_json["parameters"]["method"] == {"small": "meanshift"}  # size-scored picks
    assert len(pd.read_csv(out)) == 2
    result, out = run("--method", "components")  # an explicit method wins
    assert result.exit_code == 0, result.output
    assert json.loads((out.parent / "run.json").read_text())["parameters"]["method"] == "components"
    # a method nobody knows in the file: one error line naming it, exit 2, nothing written
    table = (tmp_path / "seg" / "pick_thresholds.csv").read_text()
    (tmp_path / "seg" / "pick_thresholds.csv").write_text(table.replace("meanshift", "magic"))
    result, out = run("--format", "csv", "--min-size-fraction", "0.2", "--quiet")
    assert result.exit_code == 2 and "method 'magic' of small" in result.output
    assert not out.exists()
