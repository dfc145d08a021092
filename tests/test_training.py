"""cryocaps train: data checks, patch sampling, augmentation, loop, checkpoints, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryocaps.errors import CryocapsError
from cryocaps.io.volumes import write_volume
from cryocaps.training import (
    Augmentation,
    ParticleSet,
    PatchSampler,
    TrainingVolume,
    split_particles,
)

TINY_UNET = ["--model", "unet", "--model-option", "widths=4,4,4"]
TINY_OPTIONS = {"widths": [4, 4, 4]}
SHAPE = (24, 40, 40)
VOXEL = 10.0


def _make_dataset(folder: Path, n_tomograms: int = 2, seed: int = 0) -> Path:
    """Tomograms with dark spheres of two classes (radius 3 and 5 voxels) and their label maps."""
    rng = np.random.default_rng(seed)
    (folder / "tomograms").mkdir(parents=True)
    (folder / "labels").mkdir()
    zz, yy, xx = np.indices(SHAPE)
    for t in range(n_tomograms):
        volume = rng.normal(0, 0.5, SHAPE).astype(np.float32)
        label_map = np.zeros(SHAPE, np.uint8)
        grid = [(z, y, x) for z in (7, 16) for y in (8, 20, 32) for x in (8, 20, 32)]
        order = rng.permutation(len(grid))
        for k, index in enumerate(order[:8]):
            label, radius = (1, 3) if k % 2 == 0 else (2, 5)
            z, y, x = grid[index]
            inside = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
            volume[inside] -= 2.0
            label_map[inside & (label_map == 0)] = label
        write_volume(folder / "tomograms" / f"tomo_{t}.mrc", volume, VOXEL)
        write_volume(folder / "labels" / f"tomo_{t}_labels.mrc", label_map, VOXEL, dtype="uint8")
    (folder / "classes.csv").write_text("label,name,radius_angstrom\n1,small,30\n2,large,50\n")
    return folder


@pytest.fixture
def dataset(tmp_path) -> Path:
    return _make_dataset(tmp_path / "data")


def _config(dataset: Path, out_dir: Path, **overrides):
    from cryocaps.training import TrainConfig

    settings = dict(
        tomograms=[dataset / "tomograms"],
        labels=[dataset / "labels"],
        out_dir=out_dir,
        model="unet",
        model_options=TINY_OPTIONS,
        patch_size=16,
        batch_size=2,
        epochs=2,
        steps_per_epoch=3,
        max_val_patches=8,
        seed=3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


# --- sampler, split and augmentation -----------------------------------------------


def _volume(shape=(20, 30, 30)) -> TrainingVolume:
    data = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    return TrainingVolume("v", data, labels, {"low": -1, "high": 1, "mean": 0, "std": 1}, 10.0)


def test_sampler_is_class_balanced_and_centred():
    volume = _volume()
    centres = [(10, 5, 5)] * 9 + [(10, 20, 22)]  # class 1 nine times more common than class 2
    volume.label_map[10, 5, 5] = 1
    volume.label_map[10, 20, 22] = 2
    particles = ParticleSet(np.zeros(10, np.int64), np.array([1] * 9 + [2]), np.array(centres))
    sampler = PatchSampler(
        [volume],
        particles,
        [0],
        8,
        background_fraction=0.0,
        jitter_voxels=0,
        augmentation=None,
        seed=1,
    )
    _, labels = sampler.sample(400)
    centre_values = labels[:, 4, 4, 4]  # patches centred on the particle when it fits
    counts = np.bincount(centre_values, minlength=3)
    assert counts[0] == 0
    assert 150 < counts[2] < 250  # rare class drawn about half the time


def test_sampler_background_fraction_and_state_roundtrip():
    volume = _volume()
    particles = ParticleSet(np.zeros(1, np.int64), np.array([1]), np.array([[10, 15, 15]]))
    sampler = PatchSampler(
        [volume],
        particles,
        [0],
        8,
        background_fraction=0.25,
        jitter_voxels=2,
        augmentation=None,
        seed=5,
    )
    state = sampler.state()
    locations = [sampler.next_location()[1] for _ in range(800)]
    near = sum(
        all(abs(c + 4 - p) <= 2 for c, p in zip(corner, (10, 15, 15), strict=True))
        for corner in locations
    )
    assert 0.68 < near / 800 < 0.82  # ~75% particle patches (a few random ones land near too)
    sampler.set_state(state)
    assert [sampler.next_location()[1] for _ in range(800)] == locations


def test_hard_negatives_are_the_bright_label_free_places():
    from cryocaps.training.sampling import hard_background_centres

    rng = np.random.default_rng(0)
    shape = (24, 48, 48)
    data = rng.normal(0, 1, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    data[:, 20:24, :] += np.where(np.arange(48) % 2, 6.0, -6.0)  # a striped "membrane" at y 20-23
    data[8:16, 36:44, 36:44] -= 6.0  # a strong particle, labelled: never a hard negative
    labels[8:16, 36:44, 36:44] = 1
    stats = {"low": -1e9, "high": 1e9, "mean": 0.0, "std": 1.0}
    volume = TrainingVolume("v", data, labels, stats, 10.0)
    centres = hard_background_centres(volume)
    assert len(centres) > 0
    assert np.all(np.abs(centres[:, 1] - 22) <= 6)  # on or beside the membrane
    assert not any(36 <= y < 44 and 36 <= x < 44 for _, y, x in centres)

    particles = ParticleSet(np.zeros(1, np.int64), np.array([1]), np.array([[12, 40, 40]]))
    sampler = PatchSampler(
        [volume],
        particles,
        [0],
        8,
        background_fraction=1 - 1e-9,
        jitter_voxels=0,
        augmentation=None,
        seed=1,
        hard_negative_fraction=0.5,
    )
    centres_y = [corner[1] + 4 for _, corner in (sampler.next_location() for _ in range(400))]
    on_membrane = np.mean([abs(y - 22) <= 10 for y in centres_y])
    # half hard negatives (all near y 22) + half random (~20/48 of them near by chance)
    assert 0.6 < on_membrane < 0.85


def test_augmentation_keeps_wedge_axes_and_handedness():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 6, 6)).astype(np.float32)
    labels = (image > 0).astype(np.int64)
    allowed = [np.flip(image, axes) if axes else image for axes in [(), (1, 2), (0, 2), (0, 1)]]
    augment = Augmentation(intensity=False)
    seen = set()
    for _ in range(40):
        out, out_labels = augment(image, labels, rng)
        match = [i for i, a in enumerate(allowed) if np.array_equal(out, a)]
        assert len(match) == 1, "not a 180° rotation about Z, Y or X"
        assert np.array_equal(out_labels, (out > 0).astype(np.int64))  # labels move with the image
        seen.add(match[0])
    assert seen == {0, 1, 2, 3}
    rot = Augmentation(intensity=False, rotate180=False, rot90=True)
    outs = [rot(image, labels, rng)[0] for _ in range(20)]
    assert any(np.array_equal(o, np.rot90(image, 1, axes=(1, 2))) for o in outs)


def test_split_is_stratified_and_folds_partition():
    labels = np.array([1] * 12 + [2] * 6 + [3])
    particles = ParticleSet(
        np.zeros(len(labels), np.int64), labels, np.zeros((len(labels), 3), np.int64)
    )
    train, val = split_particles(particles, val_fraction=0.17, fold=None, seed=0)
    assert np.bincount(labels[val], minlength=4).tolist() == [
        0,
        2,
        1,
        0,
    ]  # class 3 stays in training
    assert not (train & val).any()
    folds = [
        split_particles(particles, val_fraction=0.17, fold=(k, 6), seed=0)[1] for k in range(1, 7)
    ]
    assert np.array_equal(np.sum(folds, axis=0), np.ones(len(labels)))


def test_plot_learning_curve_draws_the_metrics(tmp_path):
    import matplotlib.pyplot as plt

    from cryocaps.plots import learning_curve_figure, plot_learning_curve

    frame = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [1.0, 0.5, 0.25],
            "val_loss": [1.1, 0.7, 0.65],
            "dice_a": [0.1, 0.4, 0.5],
            "dice_b": [0.2, float("nan"), 0.3],
            "mean_dice": [0.15, 0.4, 0.4],
        }
    )
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    figure = learning_curve_figure(tmp_path / "metrics.csv")
    loss_axes, dice_axes = figure.axes
    drawn = {line.get_label(): line for axes in figure.axes for line in axes.get_lines()}
    want = {
        "train loss": "train_loss",
        "val loss": "val_loss",
        "a": "dice_a",
        "b": "dice_b",
        "mean": "mean_dice",
    }
    assert set(drawn) == set(want)
    for label, column in want.items():
        np.testing.assert_array_equal(drawn[label].get_xdata(), frame["epoch"])
        np.testing.assert_array_equal(drawn[label].get_ydata(), frame[column])
    assert {line.get_label() for line in loss_axes.get_lines()} == {"train loss", "val loss"}
    plt.close(figure)
    path = plot_learning_curve(tmp_path / "metrics.csv", tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_curve_has_a_panel_for_the_held_out_regions(tmp_path):
    import matplotlib.pyplot as plt

    from cryocaps.plots import learning_curve_figure

    nan = float("nan")
    frame = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [1.0, 0.5, 0.25],
            "val_loss": [1.1, 0.7, 0.65],
            "dice_a": [0.1, 0.4, 0.5],
            "val_macro_f1": [0.2, nan, 0.8],  # epoch 2 had no region validation
            "val_background_share_a": [0.3, nan, 0.01],
        }
    )
    figure = learning_curve_figure(frame)
    assert len(figure.axes) == 4  # loss, Dice, held-out F1 and its twin for the shares
    drawn = {line.get_label(): line for axes in figure.axes for line in axes.get_lines()}
    np.testing.assert_array_equal(drawn["macro F1"].get_xdata(), [1, 3])
    np.testing.assert_array_equal(drawn["macro F1"].get_ydata(), [0.2, 0.8])
    np.testing.assert_array_equal(drawn["a (background share)"].get_ydata(), [0.3, 0.01])
    plt.close(figure)


def test_cli_defaults_are_the_config_defaults():
    import inspect

    from cryocaps.cli.train import command
    from cryocaps.training import defaults

    config_defaults = defaults()
    checked = 0
    for name, parameter in inspect.signature(command).parameters.items():
        if name in config_defaults and parameter.default is not inspect.Parameter.empty:
            expected = config_defaults[name]
            # repeatable options default to None on the command line and to [] in TrainConfig
            assert parameter.default == (None if expected == [] else expected), name
            checked += 1
    assert checked >= 25


def test_train_state_saves_and_restores_every_field():
    import dataclasses
    import math

    from cryocaps.training import TrainState

    class Driven:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, saved):
            self.value = saved["value"]

    def state(value):
        return TrainState(
            epoch=value,
            step_in_epoch=value,
            total_steps=value,
            skipped_steps=value,
            epoch_loss_sum=float(value),
            epoch_loss_count=value,
            epoch_seconds=float(value),
            train_seconds=float(value),
            rows=[{"epoch": value}],
            best_score=[float(value)],
            best_val_loss=float(value),
            best_epoch=value,
            bad_epochs=value,
            best_thresholds={"epoch": value},
            best_regions={"epoch": value},
            region_interval=float(value),
            last_region_epoch=value,
            model_saved=bool(value),
            annealing=bool(value),
            anneal_from_step=value,
            ema_decay=float(value),
            unannotated={"epoch": value},
            model=Driven(value),
            optimizer=Driven(value),
            scheduler=Driven(value),
            ema=Driven(value),
            scaler=Driven(value),
            sampler_streams=Driven(value),
            process_rng=Driven(value),
        )

    names = {f.name for f in dataclasses.fields(TrainState)}
    saved = state(7).state_dict()
    assert set(saved) == names
    restored = state(0)
    restored.load_state_dict(saved)
    for name in names:
        value = getattr(restored, name)
        value = value.value if isinstance(value, Driven) else value
        assert value in (7, 7.0, True, [{"epoch": 7}], [7.0], {"epoch": 7}), name
    with pytest.raises(CryocapsError, match="lacks epoch"):
        restored.load_state_dict({k: v for k, v in saved.items() if k != "epoch"})
    restored.load_state_dict({k: v for k, v in saved.items() if k != "ema"})  # added later
    assert restored.ema.value == 7  # nothing saved: left as it was
    assert TrainState().best_score is None
    restored.load_state_dict({**saved, "best_score": 0.5})  # a float: written before lists
    assert restored.best_score == [0.5]
    restored.load_state_dict({**saved, "best_score": -math.inf})
    assert restored.best_score is None


# --- the command -------------------------------------------------------------------


@pytest.mark.slow
def test_train_cli_writes_model_metrics_and_run_json(run_cli, dataset, tmp_path):
    from cryocaps.modelfile import load_model

    out = tmp_path / "run"
    result = run_cli(
        "train",
        "--tomograms",
        dataset / "tomograms",
        "--labels",
        dataset / "labels",
        "-o",
        out,
        *TINY_UNET,
        "--patch-size",
        "16",
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "3",
        "--max-val-patches",
        "8",
    )
    assert result.exit_code == 0, result.output
    for name in (
        "config.json",
        "model.pt",
        "checkpoint_last.pt",
        "checkpoint_best.pt",
        "learning_curve.png",
    ):
        assert (out / name).is_file(), name
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    assert {
        "train_loss",
        "val_loss",
        "dice_small",
        "dice_large",
        "mean_dice",
        "lr",
        "seconds",
    } <= set(metrics)
    assert metrics[["dice_small", "dice_large"]].stack().between(0, 1).all()
    run = json.loads((out / "run.json").read_text())
    assert run["results"]["world_size"] == 1
    assert run["results"]["steps_done"] == 6
    assert run["results"]["samples_per_second"] > 0
    # 6 steps: too short to anneal, so --lr-schedule auto kept the rate, without an average
    assert run["parameters"]["lr_schedule"] == "auto" and run["parameters"]["ema"] == "auto"
    assert run["results"]["lr_schedule"] == "none" and run["results"]["ema"] is None
    assert "Learning rate: constant" in result.output
    model, config = load_model(out)
    assert config["patch_size"] == 16 and config["voxel_size_angstrom"] == VOXEL
    assert [c["name"] for c in config["classes"]] == ["small", "large"]
    assert config["normalization"]["method"] == "percentile_zscore"
    assert model.config["widths"] == [4, 4, 4]
    # a second run into the same folder is refused
    again = run_cli(
        "train", "-t", dataset / "tomograms", "-l", dataset / "labels", "-o", out, *TINY_UNET
    )
    assert again.exit_code == 2 and "--resume" in again.output


@pytest.mark.slow
def test_resume_after_signal_matches_uninterrupted_run(dataset, tmp_path):
    from cryocaps.training import train

    full = train(_config(dataset, tmp_path / "full", epochs=3))
    assert full["stopped"] == "completed"

    calls = {"n": 0}

    def interrupt_at_step_4(n=1, info=None, total=None):
        if n == 1:  # one call per step (the first call, n=0, sets the total)
            calls["n"] += 1
            if calls["n"] == 4:  # mid-epoch 2
                os.kill(os.getpid(), signal.SIGINT)

    part = train(_config(dataset, tmp_path / "part", epochs=3), progress=interrupt_at_step_4)
    assert part["stopped"] == "SIGINT"
    assert (part["epochs_done"], part["steps_in_partial_epoch"]) == (1, 1)
    resumed = train(_config(dataset, tmp_path / "part", epochs=3, resume=True))
    assert resumed["steps_done"] == 9 and resumed["steps_this_run"] == 5
    a = pd.read_csv(tmp_path / "full" / "metrics.csv")
    b = pd.read_csv(tmp_path / "part" / "metrics.csv")
    columns = ["train_loss", "val_loss", "dice_small", "dice_large"]
    np.testing.assert_allclose(b[columns].to_numpy(), a[columns].to_numpy(), rtol=1e-5)


def test_gradient_guard_refuses_non_finite_gradients_and_stops_a_run_of_them():
    import torch

    from cryocaps.training import TrainState
    from cryocaps.training.guard import GradientGuard

    state = TrainState(model=torch.nn.Linear(3, 2))
    guard = GradientGuard(limit=3)
    for p in state.model.parameters():
        p.grad = torch.ones_like(p)
    assert guard.allows_update(state) and state.skipped_steps == 0
    state.model.bias.grad[1] = float("inf")
    assert not guard.allows_update(state) and state.skipped_steps == 1
    state.model.bias.grad[1] = float("nan")
    assert not guard.allows_update(state) and state.skipped_steps == 2
    state.model.bias.grad[1] = 0.0
    assert guard.allows_update(state) and guard.in_a_row == 0  # a good step resets the run
    state.model.weight.grad[0, 0] = float("nan")
    assert not guard.allows_update(state) and not guard.allows_update(state)
    with pytest.raises(CryocapsError, match="3 steps in a row with gradients that are not"):
        guard.allows_update(state)
    assert state.skipped_steps == 5


def test_training_skips_a_step_whose_gradients_are_not_finite(dataset, tmp_path, monkeypatch):
    import torch

    from cryocaps.training import loop, train

    made = loop.create_model
    calls = []

    def poison(grad):  # the 2nd and 4th backward passes give NaN gradients
        calls.append(1)
        return grad * float("nan") if len(calls) in (2, 4) else grad

    def poisoned(*args, **kwargs):
        model = made(*args, **kwargs)
        next(model.parameters()).register_hook(poison)
        return model

    monkeypatch.setattr(loop, "create_model", poisoned)
    result = train(_config(dataset, tmp_path / "run", epochs=2, steps_per_epoch=3))
    assert len(calls) == 6
    assert result["steps_done"] == 6 and result["steps_skipped"] == 2
    weights = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


@pytest.mark.slow
def test_max_minutes_stops_with_a_usable_model(dataset, tmp_path):
    from cryocaps import runtime
    from cryocaps.modelfile import load_model
    from cryocaps.training import train

    segment_policy = runtime.return_freed_blocks()  # as if this process had segmented before
    result = train(_config(dataset, tmp_path / "run", epochs=50, max_minutes=1e-4))
    if segment_policy:  # glibc: training switched the process to its own malloc policy
        assert runtime.current_policy() == "keep"
    assert result["stopped"] == "max_minutes"
    assert result["steps_done"] == 1
    assert result["epochs_done"] == 1  # the epoch ended early and was validated
    load_model(tmp_path / "run")
    resumed = train(_config(dataset, tmp_path / "run", epochs=2, resume=True))
    assert resumed["steps_done"] == 4 and resumed["epochs_done"] == 2
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["steps"].tolist() == [1, 3]


def test_checkpoint_of_format_1_loads_as_a_train_state(tmp_path):
    import torch

    from cryocaps.training import TrainState
    from cryocaps.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint

    loop = {
        "epoch": 2,
        "step_in_epoch": 1,
        "epoch_loss_sum": 1.5,
        "epoch_loss_count": 1,
        "epoch_seconds": 3.0,
        "best_val_loss": 0.9,
        "best_score": 0.4,
        "best_epoch": 1,
        "bad_epochs": 1,
        "total_steps": 7,
        "train_seconds": 21.0,
        "model_saved": True,
    }
    old = {
        "format": "cryocaps-checkpoint/1",
        "model": "unet",
        "model_config": {"widths": [4, 4, 4]},
        "classes": [{"label": 1, "name": "a", "radius_angstrom": 30.0}],
        "patch_size": 16,
        "model_state": {"w": torch.ones(2)},
        "optimizer_state": {"state": {}, "param_groups": []},
        "scheduler_state": None,
        "scaler_state": None,
        "history": [{"epoch": 1}, {"epoch": 2}],
        "loop": loop,
        "rng": {"process": {"torch": torch.zeros(3)}, "samplers": [{"s": 1}]},
        "world_size": 1,
        "seed": 3,
    }
    torch.save(old, tmp_path / "old.pt")
    checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["patch_size"] == 16
    state = TrainState(process_rng=None)  # driven fields left None are not loaded
    state.load_state_dict(checkpoint["state"])  # every field present, or it raises
    for name, value in loop.items():
        expected = [value] if name == "best_score" else value  # scores are lists now
        assert getattr(state, name) == expected, name
    assert state.rows == [{"epoch": 1}, {"epoch": 2}]
    assert checkpoint["state"]["sampler_streams"] == [{"s": 1}]
    assert torch.equal(checkpoint["state"]["model"]["w"], torch.ones(2))


# --- bad input: exit 2 and one line --------------------------------------------------


def _relabel(dataset: Path, name: str, data: np.ndarray, voxel: float = VOXEL) -> None:
    write_volume(dataset / "labels" / name, data, voxel, dtype="uint8", overwrite=True)


def _bad(run_cli, dataset, out, *extra):
    result = run_cli(
        "train",
        "-t",
        dataset / "tomograms",
        "-l",
        dataset / "labels",
        "-o",
        out,
        *TINY_UNET,
        "--patch-size",
        "16",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        *extra,
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output  # one line (INFO lines may come before it)
    return errors[0]


def test_bad_shape(run_cli, dataset, tmp_path):
    _relabel(dataset, "tomo_1_labels.mrc", np.zeros((24, 40, 38), np.uint8))
    assert "shape" in _bad(run_cli, dataset, tmp_path / "o")


def test_bad_voxel_size(run_cli, dataset, tmp_path):
    from cryocaps.io.volumes import read_tomogram

    labels = np.asarray(read_tomogram(dataset / "labels" / "tomo_1_labels.mrc").data)
    _relabel(dataset, "tomo_1_labels.mrc", labels, voxel=12.0)
    assert "voxel size" in _bad(run_cli, dataset, tmp_path / "o")


def test_label_above_class_table(run_cli, dataset, tmp_path):
    from cryocaps.io.volumes import read_tomogram

    labels = np.asarray(read_tomogram(dataset / "labels" / "tomo_0_labels.mrc").data).copy()
    labels[0, 0, 0] = 5
    _relabel(dataset, "tomo_0_labels.mrc", labels)
    assert "label value 5" in _bad(run_cli, dataset, tmp_path / "o")


def test_class_without_particles(run_cli, dataset, tmp_path):
    (dataset / "classes.csv").write_text(
        "label,name,radius_angstrom\n1,small,30\n2,large,50\n3,absent,40\n"
    )
    assert "absent" in _bad(run_cli, dataset, tmp_path / "o")


def test_patch_larger_than_tomogram(run_cli, dataset, tmp_path):
    assert "larger than tomogram" in _bad(run_cli, dataset, tmp_path / "o", "--patch-size", "32")


def test_tomogram_without_label_map(run_cli, dataset, tmp_path):
    (dataset / "labels" / "tomo_1_labels.mrc").unlink()
    assert "no label map" in _bad(run_cli, dataset, tmp_path / "o")


def test_resume_without_checkpoint(run_cli, dataset, tmp_path):
    assert "no checkpoint" in _bad(run_cli, dataset, tmp_path / "o", "--resume")


@pytest.mark.slow
def test_resume_with_another_model(run_cli, dataset, tmp_path):
    from cryocaps.training import train

    train(_config(dataset, tmp_path / "o", epochs=1, steps_per_epoch=1))
    output = _bad(run_cli, dataset, tmp_path / "o", "--resume", "--model-option", "widths=4,4,8")
    assert "options" in output


def test_bad_settings(run_cli, dataset, tmp_path):
    assert "--fold" in _bad(run_cli, dataset, tmp_path / "o", "--fold", "7/6")
    assert "--model-option" in _bad(run_cli, dataset, tmp_path / "o", "--model-option", "depth=3")
    assert "--val-tomograms" in _bad(run_cli, dataset, tmp_path / "o", "--val-tomograms", "nope")
    assert "--select-by" in _bad(run_cli, dataset, tmp_path / "o", "--select-by", "auc")
    assert "--val-every 0" in _bad(run_cli, dataset, tmp_path / "o", "--val-every", "0")
    assert "--max-val-voxels" in _bad(run_cli, dataset, tmp_path / "o", "--max-val-voxels", "0")
    assert "--hard-negatives" in _bad(run_cli, dataset, tmp_path / "o", "--hard-negatives", "2")
    assert "--ema 'often'" in _bad(run_cli, dataset, tmp_path / "o", "--ema", "often")
    assert "--ema 1.0" in _bad(run_cli, dataset, tmp_path / "o", "--ema", "1")
    assert "--lr-schedule" in _bad(run_cli, dataset, tmp_path / "o", "--lr-schedule", "step")


@pytest.mark.slow
@pytest.mark.parametrize("select_by", ["f1", "dice", "loss"])
def test_saved_model_is_the_best_epoch_by_the_chosen_score(dataset, tmp_path, select_by):
    from cryocaps.training import train

    config = _config(
        dataset, tmp_path / select_by, epochs=4, select_by=select_by, patience=0, val_every=1
    )
    result = train(config)
    history = pd.DataFrame(result["history"])
    if select_by == "f1":  # macro F1, then less background taken, then a lower loss
        keys = [history["val_macro_f1"], -history["val_background_share"], -history["val_loss"]]
        scores = list(zip(*keys, strict=True))
    else:
        scores = list(history["mean_dice"] if select_by == "dice" else -history["val_loss"])
    # the first of the best epochs (later ties are not improvements)
    assert result["best_epoch"] == int(history["epoch"][scores.index(max(scores))])
    saved = json.loads((tmp_path / select_by / "config.json").read_text())
    assert saved["training"]["epoch"] == result["best_epoch"]
    # the thresholds in the model were tuned on the best epoch's picks
    assert saved["pick_thresholds"]["epoch"] == result["best_epoch"]
    assert saved["pick_thresholds"] == {
        "calibrated_on": result["validation"]["held_out"],
        "epoch": result["best_epoch"],
        **result["pick_thresholds"],
    }


def test_cosine_lr_warms_up_then_anneals_to_the_floor():
    from cryocaps.training.hooks import cosine_lr

    assert cosine_lr(1.0, 0.0, 0.1, 0.01) == pytest.approx(0.1)
    assert cosine_lr(1.0, 0.05, 0.1, 0.01) == pytest.approx(0.55)
    assert cosine_lr(1.0, 0.1, 0.1, 0.01) == pytest.approx(1.0)
    assert cosine_lr(1.0, 0.55, 0.1, 0.01) == pytest.approx(0.505)  # half way down
    assert cosine_lr(1.0, 1.0, 0.1, 0.01) == pytest.approx(0.01)
    after = [cosine_lr(1.0, p, 0.1, 0.01) for p in np.linspace(0.1, 1.0, 50)]
    assert all(a > b for a, b in zip(after[:-1], after[1:], strict=True))


def test_cosine_schedule_follows_the_time_budget_when_it_ends_the_run(monkeypatch):
    from cryocaps.training import hooks

    now = [1000.0]
    monkeypatch.setattr(hooks.time, "time", lambda: now[0])
    schedule = hooks.CosineSchedule(lr=1e-3, total_steps=30000, max_minutes=10)
    assert schedule.progress(0) == 0.0
    now[0] += 300  # half the budget, few steps: time decides
    assert schedule.progress(100) == pytest.approx(0.5)
    assert schedule.progress(24000) == pytest.approx(0.8)  # steps ahead of time: steps decide
    now[0] += 600
    assert schedule.progress(200) == 1.0
    without_budget = hooks.CosineSchedule(lr=1e-3, total_steps=400, max_minutes=None)
    assert without_budget.progress(100) == pytest.approx(0.25)


@pytest.mark.slow
def test_train_with_cosine_schedule_records_the_falling_rate(dataset, tmp_path):
    from cryocaps.training import train

    result = train(_config(dataset, tmp_path / "cos", epochs=3, lr=1e-3, lr_schedule="cosine"))
    rates = [row["lr"] for row in result["history"]]
    # each row holds the rate set after the epoch's last step: 3, 6, 9 of 9 steps
    assert rates[0] < 1e-3 and rates[0] > rates[1] > rates[2]
    assert rates[2] == pytest.approx(1e-5)


@pytest.mark.slow
def test_ema_weights_are_the_ones_validated_saved_and_resumed(dataset, tmp_path):
    import torch

    from cryocaps.modelfile import load_model
    from cryocaps.training import train
    from cryocaps.training.checkpoint import load_checkpoint

    run = tmp_path / "ema"
    train(_config(dataset, run, epochs=1, ema=0.9, patience=0))
    state = load_checkpoint(run / "checkpoint_last.pt")["state"]
    assert int(state["ema"]["n_averaged"]) == 3  # one update per step
    saved, _ = load_model(run)
    for name, value in saved.state_dict().items():
        average = state["ema"][f"module.{name}"]
        assert torch.equal(value, average.to(value.dtype)), name
    trained = state["model"]
    assert any(
        not torch.equal(trained[name], state["ema"][f"module.{name}"])
        for name in trained
        if trained[name].is_floating_point()
    )
    resumed = train(_config(dataset, run, epochs=2, ema=0.9, patience=0, resume=True))
    assert resumed["epochs_done"] == 2
    state = load_checkpoint(run / "checkpoint_last.pt")["state"]
    assert int(state["ema"]["n_averaged"]) == 6  # the average carried over


class _Ranks:
    def mean(self, value):
        return value


def _auto_trainer(**config):
    """Just what hooks.AutoRecipe reads and calls: config, state, ranks, start_ema."""
    from types import SimpleNamespace

    from cryocaps.training.loop import TrainState

    settings = dict(lr=1e-3, epochs=300, steps_per_epoch=100, max_minutes=None) | config
    trainer = SimpleNamespace(
        config=SimpleNamespace(**settings),
        state=TrainState(optimizer=SimpleNamespace(param_groups=[{"lr": settings["lr"]}])),
        ranks=_Ranks(),
        steps_at_start=0,
        started_ema=[],
    )
    trainer.start_ema = trainer.started_ema.append
    return trainer


def test_auto_recipe_anneals_only_runs_known_to_be_long():
    from cryocaps.training import hooks

    long_run = _auto_trainer(epochs=5)  # 500 steps, no time limit: decided at the start
    recipe = hooks.AutoRecipe(long_run.config, min_steps=500, ema_decay=0.99)
    recipe.on_train_begin(long_run)
    assert long_run.state.annealing and long_run.state.anneal_from_step == 0
    assert long_run.started_ema == [0.99]
    assert long_run.state.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # warm-up
    short_run = _auto_trainer(epochs=4, max_minutes=60)  # 400 steps, whatever the time
    recipe = hooks.AutoRecipe(short_run.config, min_steps=500, ema_decay=0.99)
    recipe.on_train_begin(short_run)
    recipe.on_step_end(short_run, 0.1)
    assert short_run.state.annealing is False and short_run.state.anneal_from_step is None
    assert short_run.started_ema == []
    assert short_run.state.optimizer.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("seconds_per_epoch, anneals", [(60.0, True), (180.0, False)])
def test_auto_recipe_projects_a_timed_run_from_its_first_epoch(
    monkeypatch, seconds_per_epoch, anneals
):
    from cryocaps.training import hooks

    now = [1000.0]
    monkeypatch.setattr(hooks.time, "time", lambda: now[0])
    trainer = _auto_trainer(max_minutes=10)  # 600 s: 10 or 3.3 epochs of 100 steps
    recipe = hooks.AutoRecipe(trainer.config, min_steps=500, ema_decay=0.99)
    recipe.on_train_begin(trainer)
    assert trainer.state.annealing is None  # not known yet
    now[0] += seconds_per_epoch
    trainer.state.total_steps = 100
    recipe.on_step_end(trainer, 0.5)
    assert trainer.state.optimizer.param_groups[0]["lr"] == 1e-3  # constant until decided
    recipe.on_epoch_end(trainer, {}, True)
    assert trainer.state.annealing is anneals
    assert trainer.started_ema == ([0.99] if anneals else [])
    recipe.on_step_end(trainer, 0.5)
    rate = trainer.state.optimizer.param_groups[0]["lr"]
    if anneals:  # the cosine from the progress made: 10% of the run, no warm-up again
        assert rate == pytest.approx(hooks.cosine_lr(1e-3, 0.1, 0.03, 0.01))
        assert 0.9e-3 < rate < 1e-3
    else:
        assert rate == 1e-3


@pytest.mark.slow
def test_auto_recipe_in_a_run_is_recorded_and_survives_resume(dataset, tmp_path, monkeypatch):
    import torch

    from cryocaps.training import loop, train
    from cryocaps.training.checkpoint import load_checkpoint

    monkeypatch.setattr(loop, "AUTO_ANNEAL_MIN_STEPS", 5)  # the tiny run counts as long
    run = tmp_path / "auto"
    result = train(_config(dataset, run, epochs=2, max_minutes=30, patience=0))
    assert result["lr_schedule"] == "cosine" and result["annealed_from_step"] == 3
    assert result["ema"] == pytest.approx(0.99)
    rates = [row["lr"] for row in result["history"]]
    assert rates[0] == pytest.approx(1e-3) and rates[1] < rates[0]
    state = load_checkpoint(run / "checkpoint_last.pt")["state"]
    assert int(state["ema"]["n_averaged"]) == 3  # the average began after the first epoch
    resumed = train(_config(dataset, run, epochs=3, max_minutes=30, patience=0, resume=True))
    assert resumed["lr_schedule"] == "cosine" and resumed["annealed_from_step"] == 3
    state = load_checkpoint(run / "checkpoint_last.pt")["state"]
    assert int(state["ema"]["n_averaged"]) == 6
    assert state["annealing"] is True
    assert torch.is_tensor(state["ema"]["n_averaged"])
    short = train(_config(dataset, tmp_path / "short", epochs=1, patience=0))  # 3 < 5 steps
    assert short["lr_schedule"] == "none" and short["ema"] is None
    assert short["annealed_from_step"] is None


def test_ema_flag_takes_auto_or_a_decay():
    from cryocaps.training.config import check_settings, parse_ema

    assert parse_ema("auto") == "auto" and parse_ema(" AUTO ") == "auto"
    assert parse_ema("0.99") == 0.99 and parse_ema("0") == 0.0
    with pytest.raises(CryocapsError, match="--ema 'often'"):
        parse_ema("often")
    with pytest.raises(CryocapsError, match="--ema 1.5"):
        check_settings(_config(Path("."), Path("o"), ema=1.5))


def test_whole_tomogram_holdout(dataset, tmp_path):
    from cryocaps.training import prepare_data

    data = prepare_data(_config(dataset, tmp_path / "o", val_tomograms=["tomo_1"]))
    assert set(data.train_particles.volume.tolist()) == {0}
    assert set(data.val_particles.volume.tolist()) == {1}
    assert [region.volume for region in data.holdout.regions] == [1]
    assert [source for source, _ in data.holdout.view_sources] == [0]  # trains on tomo_0 only
    with pytest.raises(CryocapsError):
        prepare_data(_config(dataset, tmp_path / "o", val_tomograms=["tomo_0", "tomo_1"]))


# --- distributed ---------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes(dataset, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        "-m",
        "cryocaps",
        "train",
        "-t",
        str(dataset / "tomograms"),
        "-l",
        str(dataset / "labels"),
        "-o",
        str(out),
        *TINY_UNET,
        "--patch-size",
        "16",
        "--batch-size",
        "1",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--max-val-patches",
        "4",
        # the ranks average the schedule's progress and keep one weight average each
        "--lr-schedule",
        "cosine",
        "--ema",
        "0.9",
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["results"]["world_size"] == 2
    assert run["results"]["steps_done"] == 2
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 1
    assert metrics["lr"].iloc[0] < 1e-3 * 0.5  # annealed past half of the default --lr
    assert not list(out.glob("*.part"))


def test_particles_from_coords_file(dataset, tmp_path):
    from cryocaps.training import prepare_data

    from_labels = prepare_data(_config(dataset, tmp_path / "o"))
    particles = [from_labels.train_particles, from_labels.val_particles]
    rows = [
        {"tomo": f"tomo_{v}", "class_name": {1: "small", 2: "large"}[lab], "x": x, "y": y, "z": z}
        for part in particles
        for v, lab, (z, y, x) in zip(part.volume, part.label, part.zyx, strict=True)
    ]
    rows.append({"tomo": "elsewhere", "class_name": "small", "x": 1, "y": 1, "z": 1})
    pd.DataFrame(rows).to_csv(tmp_path / "picks.csv", index=False)
    data = prepare_data(_config(dataset, tmp_path / "o", coords=[tmp_path / "picks.csv"]))
    assert len(data.train_particles) + len(data.val_particles) == len(rows) - 1
    got = sorted(
        map(tuple, np.concatenate([data.train_particles.zyx, data.val_particles.zyx]).tolist())
    )
    want = sorted(map(tuple, np.concatenate([p.zyx for p in particles]).tolist()))
    assert got == want


def test_auto_patch_size():
    from cryocaps.classes import ClassTable, ParticleClass
    from cryocaps.training import auto_patch_size

    def table(*radii):
        return ClassTable([ParticleClass(i + 1, f"c{i}", r) for i, r in enumerate(radii)])

    big = [_volume((64, 128, 128))]  # 10 Å voxels
    assert auto_patch_size(table(38, 96), big) == 32  # 2 x 9.6 + 8 < 32
    assert auto_patch_size(table(38, 125), big) == 40  # 2 x 12.5 + 8 = 33 -> 40
    thin = [_volume((28, 128, 128))]
    assert auto_patch_size(table(125), thin) == 24  # fits the thinnest tomogram
