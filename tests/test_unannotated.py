"""train --unannotated auto: particles nobody annotated become unknown, not background."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_training import VOXEL, _config

from cryocaps.classes import IGNORE_LABEL
from cryocaps.io.volumes import write_volume

SHAPE = (24, 48, 48)
GRID = [(z, y, x) for z in (7, 16) for y in (8, 22, 38) for x in (8, 20, 32, 40)]


def _balls(folder: Path, annotated_dark: int, blobs: int = 0) -> tuple[Path, list]:
    """Two tomograms, each with 8 dark balls ('small', radius 3) and 4 bright ones ('large',
    radius 4) on faint noise. Every bright ball is annotated, only ``annotated_dark`` dark ones
    per tomogram. ``blobs``: as many unannotated dark blobs two thirds of a dark ball's size
    (radius sqrt 6, 81 voxels against 123) per tomogram. Returns the folder and, per tomogram,
    the centres of the unannotated balls."""
    rng = np.random.default_rng(1)
    (folder / "tomograms").mkdir(parents=True)
    (folder / "labels").mkdir()
    zz, yy, xx = np.indices(SHAPE)
    missing = []
    for t in range(2):
        volume = rng.normal(0, 0.05, SHAPE).astype(np.float32)
        label_map = np.zeros(SHAPE, np.uint8)
        order = rng.permutation(len(GRID))  # 12 of 24 places; y 38: in the held-out slab
        missing.append([])
        for k, index in enumerate(order[:12]):
            dark = k < 8
            label, radius, value = (1, 3, -2.0) if dark else (2, 4, 2.0)
            z, y, x = GRID[index]
            inside = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
            volume[inside] = value
            if dark and k >= annotated_dark:
                missing[-1].append((z, y, x))
            else:
                label_map[inside] = label
        for index in order[12 : 12 + blobs]:
            z, y, x = GRID[index]
            volume[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 6] = -2.0
        write_volume(folder / "tomograms" / f"tomo_{t}.mrc", volume, VOXEL)
        write_volume(folder / "labels" / f"tomo_{t}_labels.mrc", label_map, VOXEL, dtype="uint8")
    (folder / "classes.csv").write_text("label,name,radius_angstrom\n1,small,30\n2,large,40\n")
    return folder, missing


class _Sees:
    """A 'network' that finds every ball: dark voxels are 'small', bright ones 'large'."""

    training = False
    size_multiple = 1

    def __call__(self, x):
        import torch

        return torch.cat([torch.zeros_like(x), -8 * x - 8, 8 * x - 8], dim=1)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self


class _SeesBright(_Sees):
    """Finds the bright balls only: its 'small' class is never picked."""

    def __call__(self, x):
        import torch

        return torch.cat([torch.zeros_like(x), torch.full_like(x, -8.0), 8 * x - 8], dim=1)


def _look(data, model=None, methods=None):
    from cryocaps.runtime import Distributed
    from cryocaps.training.ranks import Ranks
    from cryocaps.training.unannotated import look_for_unannotated, training_volume_indices

    ranks = Ranks(Distributed(rank=0, world_size=1, local_rank=0, local_world_size=1))
    indices = training_volume_indices(data)
    return look_for_unannotated(
        model or _Sees(),
        data,
        indices,
        device="cpu",
        bf16=False,
        ranks=ranks,
        patch_size=16,
        methods=methods,
    )


@pytest.mark.parametrize("annotated_dark", [3, 8])
def test_the_partly_annotated_class_is_told_from_the_complete_one(tmp_path, annotated_dark):
    """3 of 8 dark balls annotated: 'small' is partial (its 10 unannotated balls picked), 'large'
    (all annotated) complete. All 8 annotated: both complete."""
    from cryocaps.training import prepare_data
    from cryocaps.training.unannotated import partly_annotated

    folder, missing = _balls(tmp_path / "data", annotated_dark)
    data = prepare_data(_config(folder, tmp_path / "o", val_fraction=0.35))
    found = _look(data)
    report = partly_annotated(found, data.classes, {"small": 1.0, "large": 1.0})
    n_missing = sum(len(m) for m in missing)
    assert report["small"]["unannotated_picks"] == n_missing
    assert report["large"]["unannotated_picks"] == 0 and not report["large"]["partial"]
    assert report["small"]["annotated_particles"] == pytest.approx(2 * annotated_dark, rel=0.35)
    assert report["small"]["partial"] == (annotated_dark == 3)
    assert report["small"]["held_out_recall"] == 1.0  # reported beside the estimate
    # two touching bright balls make one label component, whose centre no pick matches
    assert report["small"]["training_recall"] == 1.0 and report["large"]["training_recall"] >= 0.75


def test_background_picks_smaller_than_the_taught_particles_picks_are_not_places(tmp_path):
    """Noise the network paints as a class comes in fragments: dark blobs two thirds of a dark
    ball's size are picked (the picking's own limits keep them) but are not taken for
    unannotated particles; the unannotated balls are."""
    from cryocaps.training import prepare_data
    from cryocaps.training.unannotated import SMALL_PLACE, partly_annotated

    folder, missing = _balls(tmp_path / "data", 3, blobs=3)
    data = prepare_data(_config(folder, tmp_path / "o", val_fraction=0.35))
    found = _look(data)
    assert found["taught_size"][1] == 123 and 81 < SMALL_PLACE * 123
    report = partly_annotated(found, data.classes, {})
    assert report["small"]["small_picks"] == 6  # three blobs in each of the two tomograms
    assert (
        report["small"]["unannotated_picks"] == sum(len(m) for m in missing) == len(found["places"])
    )
    assert report["small"]["taught_pick_size"] == 123 and report["large"]["small_picks"] == 0


def test_the_look_reports_how_many_of_the_taught_particles_the_network_finds(tmp_path):
    """Training recall: the training particles (not the held-out ones) a pick of their class
    matches; a network blind to the dark balls finds none of the 'small' ones."""
    from cryocaps.training import prepare_data
    from cryocaps.training.unannotated import partly_annotated

    folder, _ = _balls(tmp_path / "data", 8)
    data = prepare_data(_config(folder, tmp_path / "o", val_fraction=0.35))
    found = _look(data, _SeesBright())
    taught = found["taught"]
    assert taught[1][1] == int(np.count_nonzero(data.train_particles.label == 1)) > 0
    assert taught[1][0] == 0 and taught[2][0] >= 0.75 * taught[2][1] > 0
    report = partly_annotated(found, data.classes, {})
    assert report["small"]["training_recall"] == 0.0 and report["large"]["training_recall"] >= 0.75


def test_the_look_picks_each_class_with_the_method_validation_chose(tmp_path, monkeypatch):
    import cryocaps.picking as picking
    from cryocaps.training import prepare_data
    from cryocaps.training.unannotated import chosen_methods

    thresholds = {"probability": [{"class_name": "small", "method": "meanshift"},
                                  {"class_name": "large", "method": "components"}],
                  "size_voxels": [{"class_name": "small", "method": "components"}]}  # fmt: skip
    assert chosen_methods(thresholds) == {"small": "meanshift", "large": "components"}
    assert chosen_methods(None) is None and chosen_methods({"probability": []}) is None
    folder, _ = _balls(tmp_path / "data", 3)
    data = prepare_data(_config(folder, tmp_path / "o", val_fraction=0.35))
    seen = []
    original = picking.pick_particles

    def spy(*args, **kwargs):
        seen.append(kwargs.get("method"))
        return original(*args, **kwargs)

    monkeypatch.setattr(picking, "pick_particles", spy)
    found = _look(data, methods={"small": "meanshift", "large": "components"})
    assert seen and all(m == {"small": "meanshift", "large": "components"} for m in seen)
    assert len(found["places"]) == 10  # the unannotated dark balls, one pick each


def test_unannotated_balls_become_unknown_for_patches_validation_and_negatives(tmp_path):
    """Painting: every unannotated ball's centre is unknown in the volume, in the training
    view and in validation's patch views; annotated voxels keep their labels; hard-negative and
    mined places there are dropped, those on empty background kept; the files are unchanged."""
    from cryocaps.training import prepare_data
    from cryocaps.training.data import training_sampler
    from cryocaps.training.unannotated import paint_unknown

    folder, missing = _balls(tmp_path / "data", 3)
    config = _config(folder, tmp_path / "o", val_fraction=0.35)
    data = prepare_data(config)
    before = [np.array(v.label_map).view(np.uint8) for v in data.volumes]
    sampler = training_sampler(data, config, [0, 0])
    found = _look(data)
    places = found["places"][found["places"][:, 4] == 1]
    view_index, (source, offset) = 0, data.holdout.view_sources[0]
    ball = np.array(missing[source][0]) - offset  # an unannotated ball in view 0's coordinates
    empty = np.argwhere(np.asarray(data.train_views[0].label_map) == 0)[0]
    sampler.set_mined_places(np.array([[view_index, *ball], [view_index, *empty]]))

    changed = paint_unknown(data, places)
    sampler.forget_unknown_places()

    assert changed > 0
    for index, volume in enumerate(data.volumes):
        now = np.asarray(volume.label_map).view(np.uint8)
        for centre in missing[index]:
            assert now[centre] == IGNORE_LABEL
        annotated = before[index] != 0
        assert np.array_equal(now[annotated], before[index][annotated])
        assert set(np.unique(now[~annotated]).tolist()) <= {0, IGNORE_LABEL}
    assert np.asarray(data.train_views[0].label_map)[tuple(ball)] == IGNORE_LABEL
    assert [tuple(p) for p in sampler.mined] == [(view_index, *empty)]
    for index, centres in sampler._hard:
        labels = np.asarray(data.train_views[index].label_map)[tuple(centres.T)]
        assert not np.any(labels == IGNORE_LABEL)
    on_disk = np.asarray(_read_labels(folder / "labels" / "tomo_0_labels.mrc"))
    assert np.array_equal(on_disk, before[0])


def _read_labels(path: Path) -> np.ndarray:
    from cryocaps.io.volumes import read_tomogram

    return read_tomogram(path, check_finite=False).data.view(np.uint8)


def test_a_resumed_run_paints_the_saved_places_again(tmp_path):
    """The look's places are kept in the train state; a new run (resume) reads the maps afresh
    and the hook paints the same places before the first step."""
    from cryocaps.training import prepare_data
    from cryocaps.training.data import class_weights, training_sampler
    from cryocaps.training.unannotated import LabelUnannotated

    folder, missing = _balls(tmp_path / "data", 3)
    config = _config(folder, tmp_path / "o", val_fraction=0.35)
    data = prepare_data(config)
    centre = missing[0][0]
    report = {
        "small": {"partial": True, "annotated_share": 0.3},
        "large": {"partial": False, "annotated_share": 1.0},
    }
    saved = {"places": [[0, *centre, 1]], "classes": report}
    trainer = SimpleNamespace(
        data=data,
        config=config,
        class_weights=class_weights(data, config),
        sampler=training_sampler(data, config, [0, 0]),
        validator=SimpleNamespace(regions=data.holdout.regions, views=[], partial_classes=None),
        state=SimpleNamespace(unannotated=saved),
    )
    LabelUnannotated(max_minutes=None).on_train_begin(trainer)
    assert np.asarray(data.volumes[0].label_map).view(np.uint8)[centre] == IGNORE_LABEL
    assert len(trainer.validator.views) == len(data.holdout.regions)
    assert trainer.validator.partial_classes == {"small"}  # 'large' keeps its thresholds
    # the weights as the look left them: measured on the painted maps, 'small' at its share
    assert np.allclose(trainer.class_weights, class_weights(data, config, shares={1: 0.3}))


def test_saved_label_fractions_of_a_partly_annotated_class_are_scaled_up(tmp_path):
    """A class judged 30% annotated covers about 1/0.3 of the voxels its maps give it: the
    model's label fraction (the over-segmentation warning's reference) says so; others keep
    theirs."""
    from cryocaps.training import prepare_data
    from cryocaps.training.checkpoint import model_metadata

    folder, _ = _balls(tmp_path / "data", 3)
    config = _config(folder, tmp_path / "o", val_fraction=0.35)
    data = prepare_data(config)
    plain = {c["name"]: c["label_fraction"] for c in model_metadata(config, data, {})["classes"]}
    scaled = model_metadata(config, data, {}, {"small": 0.3})["classes"]
    scaled = {c["name"]: c["label_fraction"] for c in scaled}
    assert scaled["small"] == pytest.approx(plain["small"] / 0.3, rel=1e-3)
    assert scaled["large"] == plain["large"]


class _Looked(Exception):
    pass


def _epoch_end(monkeypatch, *, epoch: int, total_steps: int):
    """LabelUnannotated.on_epoch_end of a 10-epoch run after ``epoch`` epochs and
    ``total_steps`` steps; raises _Looked when it looks."""
    from cryocaps.training import unannotated

    def look(*args, **kwargs):
        raise _Looked

    monkeypatch.setattr(unannotated, "look_for_unannotated", look)
    monkeypatch.setattr(unannotated, "training_volume_indices", lambda data: [0])
    state = SimpleNamespace(
        unannotated=None, epoch=epoch, total_steps=total_steps, best_thresholds=None
    )
    trainer = SimpleNamespace(
        state=state,
        config=SimpleNamespace(epochs=10, patch_size=16),
        ranks=SimpleNamespace(mean=lambda value: value),
        judged_model=None,
        data=None,
        device="cpu",
        bf16=False,
    )
    unannotated.LabelUnannotated(max_minutes=None).on_epoch_end(trainer, {}, False)
    return state


def test_a_run_too_short_to_trust_its_picks_does_not_look(monkeypatch):
    """The demo's case: 40% of a short run done but fewer than MIN_LOOK_STEPS steps - wait;
    still short at LAST_LOOK_AT - never look, use the maps as given and say so; with the steps
    taken, look."""
    from cryocaps.training.unannotated import MIN_LOOK_STEPS

    few = MIN_LOOK_STEPS - 1
    assert _epoch_end(monkeypatch, epoch=5, total_steps=few).unannotated is None  # wait
    skipped = _epoch_end(monkeypatch, epoch=8, total_steps=few).unannotated
    assert skipped["places"] == [] and skipped["classes"] == {}
    assert f"{few} steps" in skipped["skipped"] and "as given" in skipped["skipped"]
    assert _epoch_end(monkeypatch, epoch=3, total_steps=MIN_LOOK_STEPS).unannotated is None
    with pytest.raises(_Looked):
        _epoch_end(monkeypatch, epoch=5, total_steps=MIN_LOOK_STEPS)
    with pytest.raises(_Looked):  # steps taken late, still in time
        _epoch_end(monkeypatch, epoch=7, total_steps=MIN_LOOK_STEPS)


def test_no_look_past_the_last_chance(monkeypatch):
    """Epochs long against the run: the first epoch end past LOOK_AT comes after LAST_LOOK_AT
    (here at 90%) - too late to learn from the change: no look, and the reason says so."""
    from cryocaps.training.unannotated import LAST_LOOK_AT, MIN_LOOK_STEPS

    with pytest.raises(_Looked):  # at the last chance itself
        _epoch_end(monkeypatch, epoch=round(LAST_LOOK_AT * 10), total_steps=MIN_LOOK_STEPS)
    late = _epoch_end(monkeypatch, epoch=9, total_steps=10 * MIN_LOOK_STEPS).unannotated
    assert late["places"] == [] and late["unknown_voxels"] == 0
    assert "came at 90%" in late["skipped"] and "as given" in late["skipped"]


def test_a_partly_annotated_class_is_weighted_as_if_fully_annotated(tmp_path):
    """Fewer annotated voxels weight a class up against the background (inverse frequency): at
    a 30% share its weight over the background's is ~1/0.3 of the full one's. After the look the
    weights are measured again with the class's count divided by its estimated share, for the
    training loss and validation's alike; a complete class is left as it was."""
    import torch

    from cryocaps.training import prepare_data
    from cryocaps.training.data import MIN_SHARE, class_weights
    from cryocaps.training.unannotated import LabelUnannotated

    folder, _ = _balls(tmp_path / "data", 3)
    config = _config(folder, tmp_path / "o", val_fraction=0.35)
    data = prepare_data(config)
    plain = class_weights(data, config)
    scaled = class_weights(data, config, shares={1: 0.3})
    floor = class_weights(data, config, shares={1: 0.01})

    def over_background(weights, label):
        return float(weights[label] / weights[0])

    assert over_background(scaled, 1) == pytest.approx(0.3 * over_background(plain, 1), rel=1e-5)
    assert over_background(scaled, 2) == pytest.approx(over_background(plain, 2), rel=1e-5)
    assert over_background(floor, 1) == pytest.approx(MIN_SHARE * over_background(plain, 1), 1e-5)

    trainer = SimpleNamespace(
        data=data, config=config, class_weights=plain.clone(),
        validator=SimpleNamespace(partial_classes=set(), class_weights=plain.clone()),
    )  # fmt: skip
    report = {
        "small": {"partial": True, "annotated_share": 0.3},
        "large": {"partial": False, "annotated_share": 1.0},
    }
    LabelUnannotated._adopt_partial(trainer, report)
    assert torch.allclose(trainer.class_weights, scaled)
    assert trainer.validator.class_weights is trainer.class_weights
    assert trainer.validator.partial_classes == {"small"}
    unweighted = SimpleNamespace(data=data, config=config, class_weights=None,
                                 validator=SimpleNamespace(partial_classes=set()))  # fmt: skip
    LabelUnannotated._adopt_partial(unweighted, report)  # --no-class-weights: stays off
    assert unweighted.class_weights is None
