"""Background sampling and partial annotations: the ignore label in losses and label maps,
false positives mined between epochs, and boxes no training patch may overlap."""

from __future__ import annotations

import contextlib

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryocaps.classes import IGNORE_LABEL
from cryocaps.io.volumes import label_counts, read_tomogram, write_volume
from cryocaps.masks import UNANNOTATED_SHELL_RADII
from cryocaps.models.losses import dice_ce_loss, ucaps_loss
from cryocaps.training import ParticleSet, PatchSampler, TrainingVolume

STATS = {"low": -1e9, "high": 1e9, "mean": 0.0, "std": 1.0}


def _labels_with_unknown(shape=(2, 8, 8, 8), n_classes=3, seed=0):
    """Random labels in [0, K) with an unknown (IGNORE_LABEL) half-block in every patch."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, shape, generator=generator)
    labels[:, :4] = IGNORE_LABEL
    return labels


# --- losses ------------------------------------------------------------------------


def test_unknown_voxels_get_no_gradient_and_do_not_change_the_loss():
    labels = _labels_with_unknown()
    unknown = (labels == IGNORE_LABEL).unsqueeze(1).expand(-1, 3, -1, -1, -1)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    loss, _ = dice_ce_loss(logits, labels, torch.tensor([0.5, 1.0, 2.0]))
    loss.backward()
    assert torch.all(logits.grad[unknown] == 0)
    assert logits.grad[~unknown].abs().sum() > 0
    # whatever the network says on unknown voxels, the loss is the same
    changed = logits.detach().clone()
    changed[unknown] = torch.randn(int(unknown.sum())) * 10
    again, _ = dice_ce_loss(changed, labels, torch.tensor([0.5, 1.0, 2.0]))
    assert float(again) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_ucaps_loss_skips_unknown_voxels_in_every_term():
    labels = _labels_with_unknown(shape=(2, 8, 8, 8))
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    lengths = torch.rand(2, 3, 4, 4, 4, requires_grad=True)  # capsule grid 2x coarser
    reconstruction = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    images = torch.randn(2, 1, 8, 8, 8)
    loss, parts = ucaps_loss(logits, lengths, reconstruction, images, labels)
    loss.backward()
    unknown = labels == IGNORE_LABEL
    assert torch.all(logits.grad.movedim(1, -1)[unknown] == 0)
    assert torch.all(reconstruction.grad[:, 0][unknown] == 0)
    # capsule blocks (2³ voxels) made only of unknown voxels: the first two z-rows of blocks
    assert torch.all(lengths.grad[:, :, :2] == 0)
    assert lengths.grad[:, :, 2:].abs().sum() > 0
    assert all(np.isfinite(v) for v in parts.values())


def test_a_batch_without_annotated_voxels_has_zero_loss():
    labels = torch.full((2, 8, 8, 8), IGNORE_LABEL)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    loss, _ = dice_ce_loss(logits, labels)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.all(logits.grad == 0)


# --- make-masks --unannotated unknown ---------------------------------------------------


@pytest.fixture
def partial_project(tmp_path):
    """One 24x48x48 tomogram header and two annotated particles (radius 40 Å = 4 voxels)."""
    write_volume(tmp_path / "tomo_1.mrc", np.zeros((24, 48, 48), np.float32), 10.0)
    particles = pd.DataFrame(
        {
            "tomo": ["tomo_1", "tomo_1"],
            "class_name": ["a", "b"],
            "x": [10.0, 36.0],
            "y": [12.0, 30.0],
            "z": [12.0, 12.0],
        }
    )
    particles.to_csv(tmp_path / "picked.csv", index=False)
    (tmp_path / "classes.csv").write_text("label,name,radius_angstrom\n1,a,40\n2,b,40\n")
    return tmp_path


@pytest.mark.parametrize("shape", ["sphere"])
def test_make_masks_paints_unknown_beyond_the_shells(partial_project, run_cli, shape):
    root = partial_project
    result = run_cli(
        "make-masks", root / "picked.csv", "--tomograms", root / "tomo_1.mrc", "-o", root / "out",
        "--classes", root / "classes.csv", "--unannotated", "unknown", "--shape", shape,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    path = root / "out" / "tomo_1_labels.mrc"
    with mrcfile.open(path, permissive=True) as mrc:
        assert mrc.header.mode == 0  # still an 8-bit label map
    label_map = np.asarray(read_tomogram(path).data).view(np.uint8)
    zz, yy, xx = np.indices(label_map.shape)
    distance = np.minimum(
        np.sqrt((zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 10) ** 2),
        np.sqrt((zz - 12) ** 2 + (yy - 30) ** 2 + (xx - 36) ** 2),
    )
    shell = 4 * (1 + UNANNOTATED_SHELL_RADII)
    assert set(np.unique(label_map)) == {0, 1, 2, IGNORE_LABEL}
    assert np.all(label_map[distance <= 4] > 0) and np.all(label_map[distance <= 4] < 3)
    assert np.all(label_map[(distance > 4.01) & (distance <= shell - 0.01)] == 0)
    assert np.all(label_map[distance > shell + 0.01] == IGNORE_LABEL)
    # training reads it: the unknown voxels are not counted, nothing is refused
    counts = label_counts(label_map, 3)
    assert counts.sum() == int((label_map != IGNORE_LABEL).sum())
    summary = (root / "out" / "run.json").read_text()
    assert '"unannotated": "unknown"' in summary
    # a class's share of the tomogram is not known from partial annotations: none recorded
    assert "label_fraction" not in (root / "out" / "classes.csv").read_text()


def test_make_masks_default_has_no_unknown_voxels(partial_project, run_cli):
    root = partial_project
    result = run_cli(
        "make-masks", root / "picked.csv", "--tomograms", root / "tomo_1.mrc", "-o", root / "out",
        "--classes", root / "classes.csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    label_map = np.asarray(read_tomogram(root / "out" / "tomo_1_labels.mrc").data)
    assert set(np.unique(label_map)) == {0, 1, 2}
    assert "label_fraction" in (root / "out" / "classes.csv").read_text()


def _balls(tmp_path, sign: float):
    """A 32x64x64 noisy tomogram with 12 balls (radius 3 voxels, density ``sign``, the
    unannotated ones 1.2 x as dense as the annotated); the first four annotated (class a,
    radius 30 Å); returns the centres."""
    rng = np.random.default_rng(3)
    centres = np.array(
        [(z, y, x) for z in (10, 22) for y in (12, 32, 52) for x in (14, 48)], dtype=float
    )
    zz, yy, xx = np.indices((32, 64, 64))
    volume = rng.normal(0, 0.3, (32, 64, 64)).astype(np.float32)
    for i, (z, y, x) in enumerate(centres):
        volume[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 9] += sign * (1 if i < 4 else 1.2)
    write_volume(tmp_path / "tomo_1.mrc", volume, 10.0)
    picked = pd.DataFrame(centres[:4], columns=["z", "y", "x"]).assign(
        tomo="tomo_1", class_name="a"
    )
    picked.to_csv(tmp_path / "picked.csv", index=False)
    (tmp_path / "classes.csv").write_text("label,name,radius_angstrom\n1,a,30\n")
    return centres


@pytest.mark.parametrize("sign", [1.0, -1.0])  # particles denser or darker than the solvent
def test_make_masks_candidates_marks_the_unannotated_particles_only(tmp_path, run_cli, sign):
    centres = _balls(tmp_path, sign)
    result = run_cli(
        "make-masks", tmp_path / "picked.csv", "--tomograms", tmp_path / "tomo_1.mrc",
        "-o", tmp_path / "out", "--classes", tmp_path / "classes.csv",
        "--unannotated", "candidates",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    label_map = np.asarray(read_tomogram(tmp_path / "out" / "tomo_1_labels.mrc").data)
    label_map = label_map.view(np.uint8)
    at = label_map[tuple(centres.astype(int).T)]
    assert np.all(at[:4] == 1)  # annotated: their class
    assert np.all(at[4:] == IGNORE_LABEL)  # unannotated balls: unknown, not background
    # the rest is background: unknown only around candidates (a few noise peaks at most)
    assert (label_map == IGNORE_LABEL).mean() < 0.15
    assert (label_map == 0).mean() > 0.8
    assert "Unknown (label 255" in result.output


@pytest.mark.parametrize("named", [True, False])
def test_make_masks_candidates_reads_the_tomograms_a_tomograms_star_names(tmp_path, run_cli, named):
    """A RELION 5 tomograms.star: the rlnTomoReconstructedTomogram file (relative to the STAR
    file) is read for its voxels; without that column, one error line and nothing written."""
    from cryocaps.io.particles import write_tomograms_star
    from cryocaps.io.volumes import read_info

    centres = _balls(tmp_path, 1.0)
    info = read_info(tmp_path / "tomo_1.mrc")
    star = tmp_path / "star" / "tomograms.star"
    star.parent.mkdir()
    write_tomograms_star(star, [info], ["../tomo_1.mrc"] if named else None)
    result = run_cli(
        "make-masks", tmp_path / "picked.csv", "--tomograms", star, "-o", tmp_path / "out",
        "--classes", tmp_path / "classes.csv", "--unannotated", "candidates",
    )  # fmt: skip
    if not named:
        assert result.exit_code == 2 and "rlnTomoReconstructedTomogram" in result.output
        assert not list(tmp_path.glob("out/*_labels.mrc"))
        return
    assert result.exit_code == 0, result.output
    label_map = np.asarray(read_tomogram(tmp_path / "out" / "tomo_1_labels.mrc").data)
    at = label_map.view(np.uint8)[tuple(centres.astype(int).T)]
    assert np.all(at[:4] == 1) and np.all(at[4:] == IGNORE_LABEL)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")  # writing the bad tomogram
def test_make_masks_candidates_checks_every_tomogram_before_writing(tmp_path, run_cli):
    """A NaN tomogram after a good one: one error line naming it, and no map written at all."""
    _balls(tmp_path, 1.0)
    bad = np.zeros((32, 64, 64), np.float32)
    bad[::2] = np.nan  # every other slice: the header-time sample sees it
    write_volume(tmp_path / "tomo_2.mrc", bad, 10.0)
    picked = pd.read_csv(tmp_path / "picked.csv")
    pd.concat([picked, picked.assign(tomo="tomo_2")]).to_csv(tmp_path / "picked.csv", index=False)
    result = run_cli(
        "make-masks", tmp_path / "picked.csv", "--tomograms", tmp_path / "tomo_1.mrc",
        "--tomograms", tmp_path / "tomo_2.mrc", "-o", tmp_path / "out",
        "--classes", tmp_path / "classes.csv", "--unannotated", "candidates",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "tomo_2.mrc" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("out/*_labels.mrc"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--unannotated", "maybe"], "--unannotated 'maybe'"),
        (["--unannotated", "unknown", "--shape", "gaussian"], "--unannotated unknown"),
        (["--unannotated", "candidates", "--shape", "gaussian"], "--unannotated candidates"),
    ],
)
def test_make_masks_refuses_bad_unannotated(partial_project, run_cli, extra, message):
    root = partial_project
    result = run_cli(
        "make-masks", root / "picked.csv", "--tomograms", root / "tomo_1.mrc", "-o", root / "out",
        "--classes", root / "classes.csv", *extra,
    )  # fmt: skip
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (root / "out" / "tomo_1_labels.mrc").exists()


# --- hard negatives and mined false positives ------------------------------------------


def _volume_with_unknown():
    """Noise with a bright label-free slab in y 4-8 and an unknown (ignored) bright slab in
    y 24-28: hard negatives must come from the first only."""
    rng = np.random.default_rng(0)
    shape = (16, 32, 32)
    data = rng.normal(0, 0.3, shape).astype(np.float32)  # never above 3 (10 sigma)
    data[:, 4:8] += 6.0
    data[:, 24:28] += 6.0
    labels = np.zeros(shape, np.uint8)
    labels[:, 16:] = IGNORE_LABEL
    labels[4:8, 12:15, 4:8] = 1
    return TrainingVolume("v", data, labels, STATS, 10.0)


def test_hard_negatives_never_centre_on_unknown_voxels():
    from cryocaps.training.sampling import hard_background_centres

    centres = hard_background_centres(_volume_with_unknown())
    assert len(centres) > 0
    assert np.all(centres[:, 1] < 16)


class _SaysClassOneInABox(torch.nn.Module):
    """A stand-in network: class 1 wherever the image is above 3, background elsewhere."""

    def forward(self, images):
        bright = (images[:, 0] > 3).float()
        return torch.stack([1 - bright, bright, torch.zeros_like(bright)], dim=1)


def test_mined_places_are_predicted_classes_on_background():
    from cryocaps.training.mining import mine_false_positives

    volume = _volume_with_unknown()
    particles = ParticleSet(np.zeros(1, np.int64), np.array([1]), np.array([[6, 13, 6]]))
    sampler = PatchSampler(
        [volume],
        particles,
        [0],
        8,
        background_fraction=0.5,
        jitter_voxels=0,
        augmentation=None,
        seed=2,
        mined_negative_fraction=1.0,
    )
    places, share = mine_false_positives(
        _SaysClassOneInABox(),
        sampler,
        n_windows=64,
        per_window=4,
        batch_size=4,
        device="cpu",
        autocast=contextlib.nullcontext,
    )
    assert len(places) > 0 and 0 < share < 1
    label_at = volume.label_map[places[:, 1], places[:, 2], places[:, 3]]
    assert np.all(label_at == 0)  # background: never a particle, never an unknown voxel
    assert np.all(volume.data[places[:, 1], places[:, 2], places[:, 3]] > 3)  # where it said 1
    assert np.all((places[:, 2] >= 4) & (places[:, 2] < 8))  # the label-free bright slab
    # the sampler's background patches now centre on them, and the places survive a checkpoint
    sampler.set_mined_places(places)
    state = sampler.state()
    restored = PatchSampler(
        [volume], particles, [0], 8, background_fraction=0.5, jitter_voxels=0,
        augmentation=None, seed=99, mined_negative_fraction=1.0,
    )  # fmt: skip
    restored.set_state(state)
    assert np.array_equal(restored.mined, places)
    drawn = [sampler.next_location() for _ in range(200)]
    assert [restored.next_location() for _ in range(200)] == drawn
    background = [c for _, c in drawn if not (c[1] <= 13 < c[1] + 8 and c[2] <= 6 < c[2] + 8)]
    assert background and all(abs(c[1] + 4 - 6) <= 4 + 4 for c in background)


def test_old_sampler_state_still_loads():
    volume = _volume_with_unknown()
    particles = ParticleSet(np.zeros(1, np.int64), np.array([1]), np.array([[6, 13, 6]]))
    sampler = PatchSampler(
        [volume], particles, [0], 8, background_fraction=0.5, jitter_voxels=0,
        augmentation=None, seed=2,
    )  # fmt: skip
    old_state = sampler.rng.bit_generator.state  # what checkpoints held before mining
    first = [sampler.next_location() for _ in range(20)]
    sampler.set_state(old_state)
    assert [sampler.next_location() for _ in range(20)] == first


# --- excluded boxes ---------------------------------------------------------------------


def test_no_patch_overlaps_an_excluded_box():
    shape = (32, 40, 40)
    volume = TrainingVolume(
        "v", np.zeros(shape, np.float32), np.zeros(shape, np.uint8), STATS, 10.0
    )
    # particles right beside and inside the held-out slab z 12-20, and a hard-negative place in it
    centres = np.array([[10, 20, 20], [22, 8, 30], [16, 20, 20]])
    particles = ParticleSet(np.zeros(3, np.int64), np.array([1, 1, 1]), centres)
    box = (0, (12, 0, 0), (20, 40, 40))
    sampler = PatchSampler(
        [volume], particles, [0], 8, background_fraction=0.5, jitter_voxels=3,
        augmentation=None, seed=4, hard_negative_fraction=0.5,
        hard_centres=[(0, np.array([[16, 20, 20], [4, 4, 4]]))], mined_negative_fraction=0.5,
        excluded_boxes=[box],
    )  # fmt: skip
    sampler.set_mined_places(np.array([[0, 15, 10, 10], [0, 28, 30, 30]]))
    for _ in range(2000):
        _, (z, _, _) = sampler.next_location()
        assert z + 8 <= 12 or z >= 20


def test_defaults_are_documented(run_cli):
    from cryocaps.training.config import defaults

    train_help = run_cli("train", "--help").output
    assert "--mined-negatives" in train_help
    assert f"[default: {defaults()['mined_negative_fraction']}]" in " ".join(train_help.split())
    masks_help = " ".join(run_cli("make-masks", "--help").output.split())
    assert "--unannotated" in masks_help and "[default: background]" in masks_help


# --- a run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_on_unknown_voxels_with_mining_runs_and_checkpoints_the_places(tmp_path):
    from cryocaps.training import TrainConfig, train
    from cryocaps.training.checkpoint import LAST_CHECKPOINT, load_checkpoint

    rng = np.random.default_rng(0)
    shape = (16, 32, 32)
    (tmp_path / "tomograms").mkdir()
    (tmp_path / "labels").mkdir()
    zz, yy, xx = np.indices(shape)
    for t in range(2):
        volume = rng.normal(0, 0.5, shape).astype(np.float32)
        label_map = np.full(shape, IGNORE_LABEL, np.uint8)  # unknown but near the particles
        for z, y, x in ((8, 8, 8), (8, 22, 22), (8, 8, 24)):
            distance = np.sqrt((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2)
            label_map[distance <= 6] = 0
            label_map[distance <= 3] = 1
            volume[distance <= 3] -= 2.0
        write_volume(tmp_path / "tomograms" / f"tomo_{t}.mrc", volume, 10.0)
        write_volume(
            tmp_path / "labels" / f"tomo_{t}.mrc", label_map.view(np.int8), 10.0, dtype="int8"
        )
    (tmp_path / "classes.csv").write_text("label,name,radius_angstrom\n1,blob,30\n")
    config = TrainConfig(
        tomograms=[tmp_path / "tomograms"],
        labels=[tmp_path / "labels"],
        out_dir=tmp_path / "run",
        model="unet",
        model_options={"widths": [4, 4, 4]},
        patch_size=16,
        epochs=2,
        steps_per_epoch=3,
        max_val_patches=4,
        mined_negative_fraction=0.5,
        val_tomograms=["tomo_1"],
    )
    (tmp_path / "classes.csv").write_text(
        "label,name,radius_angstrom,label_fraction\n1,blob,30,0.01\n"
    )  # a fraction from somewhere else: unknown voxels make it meaningless, so it is dropped
    result = train(config)
    assert result["steps_done"] == 6
    import json

    model_classes = json.loads((tmp_path / "run" / "config.json").read_text())["classes"]
    assert [c.get("label_fraction") for c in model_classes] == [None]
    assert all(np.isfinite(row["train_loss"]) for row in result["history"])
    sampler_state = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)["state"]["sampler_streams"]
    assert "mined" in sampler_state[0]
    # (a network this small may not have made mistakes yet; those it made are on background)
    places = np.array(sampler_state[0]["mined"]).reshape(-1, 4)
    labels_at = [
        np.asarray(read_tomogram(tmp_path / "labels" / f"tomo_{v}.mrc").data).view(np.uint8)[
            z, y, x
        ]
        for v, z, y, x in places
    ]
    assert all(label == 0 for label in labels_at)


def test_class_weight_power_keeps_more_of_the_priors():
    from cryocaps.models.losses import class_weights_from_frequencies

    counts = [9000, 100, 100, 10]
    full = class_weights_from_frequencies(counts)
    root = class_weights_from_frequencies(counts, power=0.5)
    flat = class_weights_from_frequencies(counts, power=0.0)
    assert torch.allclose(flat, torch.ones(4))
    # the same order, square-rooted ratios: rarest / background 900 -> 30
    assert float(full[3] / full[0]) == pytest.approx(900.0, rel=1e-5)
    assert float(root[3] / root[0]) == pytest.approx(30.0, rel=1e-5)
