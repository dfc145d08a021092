"""Options no other test ran: each run through the CLI and checked by what it changes."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryocaps.io.volumes import write_volume

VOXEL = 10.0
TINY_UNET = ["--model", "unet", "--model-option", "widths=4,4,4", "--patch-size", "16"]


def _run_json(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def _data(path: Path) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as mrc:
        return np.array(mrc.data)


# --------------------------------------------------------------------------- simulate


def _simulate(run_cli, out: Path, *options) -> Path:
    result = run_cli("simulate", out, "--n-tomograms", "1", "--shape", "48,64,64",
                     "--n-particles", "4", "--seed", "5", *options)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_simulate_slab_thickness_keeps_every_particle_and_label_inside_the_slab(run_cli, tmp_path):
    out = _simulate(run_cli, tmp_path / "thin", "--slab-thickness-angstrom", "300")
    assert _run_json(out)["parameters"]["slab_thickness_angstrom"] == 300
    centre, half = (48 - 1) / 2, 300 / VOXEL / 2  # a 30-voxel slab in a 48-voxel box
    particles = pd.read_csv(out / "particles.csv")
    assert len(particles) == 4
    assert (abs(particles["z"] - centre) <= half).all(), particles["z"].tolist()
    labels = _data(next((out / "labels").glob("*.mrc")))
    labelled_z = np.nonzero(labels.any(axis=(1, 2)))[0]
    assert labelled_z.min() >= centre - half and labelled_z.max() <= centre + half


def test_simulate_voltage_and_cs_change_the_images_not_the_particles(run_cli, tmp_path):
    default = _simulate(run_cli, tmp_path / "default")
    runs = {
        "voltage_kv": _simulate(run_cli, tmp_path / "voltage", "--voltage-kv", "100"),
        "cs_mm": _simulate(run_cli, tmp_path / "cs", "--cs-mm", "0"),
    }
    tomogram = _data(default / "tomograms" / "tomo_01.mrc")
    for key, out in runs.items():
        assert _run_json(out)["parameters"][key] == {"voltage_kv": 100, "cs_mm": 0}[key]
        pd.testing.assert_frame_equal(
            pd.read_csv(out / "particles.csv"), pd.read_csv(default / "particles.csv")
        )
        other = _data(out / "tomograms" / "tomo_01.mrc")
        assert other.shape == tomogram.shape and not np.allclose(other, tomogram), key


# --------------------------------------------------------------------------- make-masks


def test_make_masks_template_threshold_sets_the_envelope(run_cli, tmp_path):
    zz, yy, xx = np.indices((15, 15, 15)) - 7
    ball = np.exp(-(zz**2 + yy**2 + xx**2) / (2 * 3.0**2)).astype(np.float32)
    write_volume(tmp_path / "ball.mrc", ball, VOXEL)
    classes = "label,name,radius_angstrom,template\n1,ball,60,ball.mrc\n"
    (tmp_path / "classes.csv").write_text(classes)
    write_volume(tmp_path / "tomos" / "TS_01.mrc", np.zeros((24, 32, 32), np.float32), VOXEL)
    pick = {"tomo": "TS_01", "class_name": "ball", "x": 16.0, "y": 16.0, "z": 12.0, "score": 1.0}
    pd.DataFrame([pick]).to_csv(tmp_path / "picks.csv", index=False)
    inside = {}
    for threshold in ("0.2", "0.6"):
        out = tmp_path / f"masks_{threshold}"
        result = run_cli("make-masks", tmp_path / "picks.csv", "--tomograms", tmp_path / "tomos",
                         "--classes", tmp_path / "classes.csv", "--shape", "template",
                         "--template-threshold", threshold, "-o", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        inside[threshold] = int(np.count_nonzero(_data(out / "TS_01_labels.mrc")))
    # a Gaussian of sigma 3 voxels is above f of its peak within 3 sqrt(-2 ln f) voxels
    for threshold, count in inside.items():
        radius = 3.0 * np.sqrt(-2 * np.log(float(threshold)))
        assert count == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.25), (threshold, count)
    assert inside["0.6"] < inside["0.2"] / 3


# --------------------------------------------------------------------------- evaluate


def _picks_and_truth(folder: Path) -> tuple[Path, Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.csv").write_text("label,name,radius_angstrom\n1,ribo,40\n")
    truth = pd.DataFrame({"tomo": "TS_01", "class_name": "ribo", "x": [10.0, 30.0],
                          "y": [12.0, 20.0], "z": [6.0, 14.0], "score": 1.0})  # fmt: skip
    truth.to_csv(folder / "truth.csv", index=False)
    truth.assign(x=truth["x"] + 1).to_csv(folder / "picks.csv", index=False)
    return folder / "picks.csv", folder / "truth.csv", folder / "classes.csv"


def test_evaluate_overlay_slices_sets_the_panels_of_the_figure(run_cli, tmp_path):
    from PIL import Image

    picks, truth, classes = _picks_and_truth(tmp_path / "data")
    tomogram = tmp_path / "TS_01.mrc"
    write_volume(tomogram, np.random.default_rng(0).normal(size=(20, 40, 40)).astype("f4"), VOXEL)
    widths = {}
    for slices in ("1", "4"):
        report = tmp_path / f"report_{slices}"
        result = run_cli("evaluate", picks, truth, "--classes", classes, "--tomograms",
                         tomogram, "--overlay", tomogram, "--overlay-slices", slices,
                         "-o", report)  # fmt: skip
        assert result.exit_code == 0, result.output
        widths[slices] = Image.open(report / "overlay_TS_01.png").size[0]
    assert widths["4"] / widths["1"] == pytest.approx(4, rel=0.1)  # one panel per slab


def test_verbose_logs_debug_lines_and_quiet_default_does_not(run_cli, tmp_path, monkeypatch):
    from cryocaps.cli import common

    monkeypatch.setitem(common._state, "verbose", False)  # --verbose sticks for the process
    tomogram = tmp_path / "TS_01.mrc"
    write_volume(tomogram, np.zeros((20, 40, 40), np.float32), VOXEL)
    picks, _, classes = _picks_and_truth(tmp_path / "data")
    args = ["convert-picks", picks, "--tomograms", tomogram, "--classes", classes]
    plain = run_cli(*args, "-o", tmp_path / "plain.star")
    verbose = run_cli(*args, "-o", tmp_path / "verbose.star", "--verbose")
    assert plain.exit_code == 0 and verbose.exit_code == 0, verbose.output
    debug_line = "2 particles read as csv"
    assert debug_line in verbose.output and debug_line not in plain.output


# --------------------------------------------------------------------------- copick


def test_copick_objects_selects_the_picks_read_from_a_project(run_cli, tmp_path):
    copick = pytest.importorskip("copick")
    from copick.models import PickableObject

    config = tmp_path / "project" / "config.json"
    objects = [
        PickableObject(name="ribosome", is_particle=True, label=1, radius=60.0),
        PickableObject(name="proteasome", is_particle=True, label=2, radius=40.0),
    ]
    root = copick.new_config(
        str(config), overlay_root=str(tmp_path / "project" / "overlay"), pickable_objects=objects
    )
    run = root.new_run("TS_01")
    run.new_voxel_spacing(VOXEL).new_tomogram("wbp").from_numpy(np.zeros((12, 16, 20), "f4"))
    rng = np.random.default_rng(0)
    for name, count in (("ribosome", 3), ("proteasome", 2)):
        picks = run.new_picks(name, session_id="0", user_id="curator")
        picks.from_numpy(rng.uniform(20, 110, size=(count, 3)), np.tile(np.eye(4), (count, 1, 1)))
    tables = {}
    for objects_option in ([], ["--copick-objects", "proteasome"]):
        out = tmp_path / f"picks{len(objects_option)}.csv"
        result = run_cli("convert-picks", config, *objects_option, "-o", out)
        assert result.exit_code == 0, result.output
        tables[len(objects_option)] = pd.read_csv(out)
    assert sorted(tables[0]["class_name"]) == ["proteasome"] * 2 + ["ribosome"] * 3
    assert list(tables[2]["class_name"]) == ["proteasome"] * 2


# --------------------------------------------------------------------------- train and segment


@pytest.fixture
def training_data(tmp_path) -> Path:
    """Two tomograms of dark spheres (radius 3 and 5 voxels, two classes) and their label maps."""
    rng = np.random.default_rng(0)
    shape = (24, 40, 40)
    zz, yy, xx = np.indices(shape)
    folder = tmp_path / "data"
    for t in range(2):
        volume = rng.normal(0, 0.5, shape).astype(np.float32)
        labels = np.zeros(shape, np.uint8)
        for k, (z, y, x) in enumerate([(7, 8, 8), (16, 20, 32), (7, 32, 20), (16, 8, 20)]):
            label, radius = (1, 3) if k % 2 == 0 else (2, 5)
            inside = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
            volume[inside] -= 2.0
            labels[inside] = label
        write_volume(folder / "tomograms" / f"tomo_{t}.mrc", volume, VOXEL)
        write_volume(folder / "labels" / f"tomo_{t}_labels.mrc", labels, VOXEL, dtype="uint8")
    (folder / "classes.csv").write_text("label,name,radius_angstrom\n1,small,30\n2,large,50\n")
    return folder


def _train(run_cli, data: Path, out: Path, *options):
    result = run_cli("train", "-t", data / "tomograms", "-l", data / "labels", *TINY_UNET,
                     "--max-val-patches", "4", "--seed", "3", "-o", out, *options)  # fmt: skip
    assert result.exit_code == 0, result.output
    return _run_json(out), pd.read_csv(out / "metrics.csv")


def test_train_mirror_flips_the_training_patches(run_cli, training_data, tmp_path):
    short = ["--epochs", "1", "--steps-per-epoch", "3"]
    plain, plain_metrics = _train(run_cli, training_data, tmp_path / "plain", *short)
    mirrored, mirrored_metrics = _train(
        run_cli, training_data, tmp_path / "mirror", *short, "--mirror"
    )
    assert plain["parameters"]["mirror"] is False and mirrored["parameters"]["mirror"] is True
    # the same seed draws the same patches; half of them are now flipped, so the loss differs
    assert mirrored_metrics["train_loss"][0] != pytest.approx(plain_metrics["train_loss"][0])


def test_train_patience_stops_after_that_many_epochs_without_a_better_score(
    run_cli, training_data, tmp_path
):
    # a rate too small to change the weights: the validation score cannot improve after epoch 1
    record, metrics = _train(run_cli, training_data, tmp_path / "run", "--epochs", "20",
                             "--steps-per-epoch", "1", "--lr", "1e-12", "--patience", "2",
                             "--select-by", "loss")  # fmt: skip
    results = record["results"]
    assert results["stopped"] == "early_stopping"
    assert results["epochs_done"] == results["best_epoch"] + 2 < 20
    assert len(metrics) == results["epochs_done"]


def test_train_lr_schedule_plateau_halves_the_rate_after_bad_epochs(
    run_cli, training_data, tmp_path
):
    # a rate too small to improve the validation loss much (but above the scheduler's eps)
    lr = 1e-6
    record, metrics = _train(run_cli, training_data, tmp_path / "run", "--epochs", "6",
                             "--steps-per-epoch", "1", "--lr", str(lr), "--lr-schedule", "plateau",
                             "--patience", "0")  # fmt: skip
    assert record["results"]["lr_schedule"] == "plateau" and len(metrics) == 6
    # ReduceLROnPlateau(factor 0.5, patience max(1, 0 // 3) = 1) on the validation loss:
    # halved after two epochs that did not beat the best by 1e-4 (relative)
    expected, best, bad, rate = [], np.inf, 0, lr
    for loss in metrics["val_loss"]:
        expected.append(rate)
        if loss < best * (1 - 1e-4):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > 1:
            rate, bad = rate / 2, 0
    np.testing.assert_allclose(metrics["lr"], expected, rtol=1e-6)
    assert metrics["lr"].iloc[-1] < lr  # the schedule did act


def test_bf16_flag_is_what_train_and_segment_use(run_cli, training_data, tmp_path):
    short = ["--epochs", "1", "--steps-per-epoch", "2"]
    maps = {}
    for flag, expected in (("--bf16", True), ("--no-bf16", False)):
        run = tmp_path / f"run{flag}"
        record, _ = _train(run_cli, training_data, run, *short, flag)
        assert record["results"]["bf16"] is expected
        out = tmp_path / f"segment{flag}"
        result = run_cli("segment", training_data / "tomograms", "--model", tmp_path / "run--bf16",
                         "-o", out, "--probabilities", flag)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert _run_json(out)["parameters"]["bf16"] is expected
        maps[flag] = _data(out / "tomo_0_probs.mrc").astype(np.float32)
    difference = np.abs(maps["--bf16"] - maps["--no-bf16"])
    assert 0 < difference.max() < 0.1  # bfloat16 rounding: close, not equal


# --------------------------------------------------------------------------- --lr-schedule auto


@pytest.mark.parametrize("steps, anneals", [(499, False), (500, True)])
def test_auto_schedule_anneals_from_500_planned_steps_as_train_wires_it(steps, anneals):
    """The rule at its boundary, through the hooks ``train`` builds (the real threshold)."""
    from types import SimpleNamespace

    from cryocaps.training import hooks
    from cryocaps.training.config import AUTO_ANNEAL_MIN_STEPS, TrainConfig
    from cryocaps.training.loop import TrainState, default_hooks

    assert AUTO_ANNEAL_MIN_STEPS == 500  # README and RESULTS.md give this number
    ranks = SimpleNamespace(is_main=True, mean=lambda value: value)
    for epochs, steps_per_epoch in ((1, steps), (steps, 1)):
        config = TrainConfig(tomograms=[], labels=[], out_dir=Path("unused"), epochs=epochs,
                             steps_per_epoch=steps_per_epoch)  # fmt: skip
        (recipe,) = [
            h for h in default_hooks(config, ranks, None) if isinstance(h, hooks.AutoRecipe)
        ]
        trainer = SimpleNamespace(
            config=config,
            state=TrainState(optimizer=SimpleNamespace(param_groups=[{"lr": config.lr}])),
            ranks=ranks,
            steps_at_start=0,
            started_ema=[],
        )
        trainer.start_ema = trainer.started_ema.append
        recipe.on_train_begin(trainer)
        assert trainer.state.annealing is anneals
        assert trainer.started_ema == ([0.99] if anneals else [])
        rate = trainer.state.optimizer.param_groups[0]["lr"]
        assert (rate < config.lr) is anneals  # the cosine's warm-up starts below --lr
