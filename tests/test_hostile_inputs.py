"""Hostile input, every command: one red line, exit code 2, no traceback, nothing written.

One table of bad inputs (:data:`CASES`) run through the CLI in-process. Each case
gives the command line (``{name}`` fields are paths of the shared fixtures below,
``{out}`` a fresh output path of the case) and the words its one error line must
name: the flag, the file or the value at fault. For every case the test checks the
exit code (2), that exactly one line says ``Error`` and names them, that no
traceback and no "a value no check caught" fallback appears, and that no file or
folder was added, removed or changed: neither under the case's output names nor
among the shared inputs (so an output that existed before is left as it was).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from cryocaps.cli import common
from cryocaps.cli.main import app

BASE_SIMULATE = ["--shape", "32,48,48", "--voxel-size-angstrom", "20", "--n-tomograms", "1"]


@dataclass
class Case:
    """A bad command line and what its error line must name."""

    name: str
    argv: list[str]
    names: list[str]  # every one appears in the error line
    setup: str | None = None  # a function of SETUPS: prepares the case's folder or patches
    env: dict[str, str] = field(default_factory=dict)


def case(name, argv, *names, setup=None, env=None) -> Case:
    return Case(name, argv.split(), list(names), setup, env or {})


SIM = "simulate {out} " + " ".join(BASE_SIMULATE)
PRE = "preprocess {tomo} -o {out}"
MASKS = "make-masks {star} --tomograms {tomos} --classes {classes} -o {out}"
TRAIN = (
    "train --tomograms {tomo} --labels {label} --classes {classes} -o {out} --model unet "
    "--epochs 1 --steps-per-epoch 1 --patch-size 16 --max-val-patches 1 "
    "--model-option widths=4,4,4 --val-fraction 0.4"
)
SEG = "segment {tomo} --model {model} -o {out}"
PICK = "cluster-picks {label} --classes {classes} -o {out}/picks.star"
CONVERT = "convert-picks {csv} -o {out}/picks.csv"
EVAL = "evaluate {csv} {csv} --classes {classes} --voxel-size-angstrom 20"
DEMO = "demo {out} --model unet --epochs 1 --steps-per-epoch 1"

CASES = [
    # --- simulate
    case("simulate-seed-negative", SIM + " --seed -1", "--seed", "-1"),
    case("simulate-seed-huge", SIM + " --seed 99999999999999", "--seed", "99999999999999"),
    case("simulate-into-a-file", "simulate {file} " + " ".join(BASE_SIMULATE), "{file}"),
    case("simulate-under-a-file", "simulate {file}/data " + " ".join(BASE_SIMULATE), "{file}"),
    case("simulate-shape-huge", "simulate {out} --shape 100000,100000,100000", "--shape", "memory"),
    case("simulate-shape-zero", "simulate {out} --shape 0,48,48", "--shape", "0,48,48"),
    case("simulate-shape-text", "simulate {out} --shape big", "--shape", "big"),
    case("simulate-cs-nan", SIM + " --cs-mm nan", "--cs-mm", "nan"),
    case("simulate-cs-negative", SIM + " --cs-mm -2", "--cs-mm", "-2"),
    case("simulate-defocus-inf", SIM + " --defocus-um inf", "--defocus-um", "inf"),
    case("simulate-defocus-zero", SIM + " --defocus-um 0", "--defocus-um", "0"),
    case("simulate-voltage-nan", SIM + " --voltage-kv nan", "--voltage-kv", "nan"),
    case("simulate-voxel-inf", SIM + " --voxel-size-angstrom inf", "--voxel-size-angstrom", "inf"),
    case("simulate-voxel-negative", SIM + " --voxel-size-angstrom -5", "--voxel-size-angstrom"),
    case("simulate-snr-zero", SIM + " --snr 0", "--snr", "0"),
    case("simulate-tilt-range-huge", SIM + " --tilt-range-deg 400", "--tilt-range-deg", "400"),
    case("simulate-tilt-step-nan", SIM + " --tilt-step-deg nan", "--tilt-step-deg", "nan"),
    case("simulate-tomograms-zero", SIM + " --n-tomograms 0", "--n-tomograms", "0"),
    case("simulate-particles-negative", SIM + " --n-particles -4", "--n-particles", "-4"),
    case(
        "simulate-particles-huge", SIM + " --n-particles 1000000000", "--n-particles", "1000000000"
    ),
    case("simulate-crowding-nan", SIM + " --crowding nan", "--crowding", "nan"),
    case("simulate-contrast-huge", SIM + " --amplitude-contrast 7", "--amplitude-contrast", "7"),
    case(
        "simulate-slab-negative",
        SIM + " --slab-thickness-angstrom -100",
        "--slab-thickness-angstrom",
        "-100",
    ),
    case("simulate-output-exists", SIM, "{out}/classes.csv", "--overwrite", setup="old_outputs"),
    case("simulate-disk-full", SIM, "{out}", "No space left", setup="disk_full"),
    case("simulate-read-only", SIM, "{out}", "Permission denied", setup="read_only"),
    case("simulate-structures-garbage", SIM + " --structures {bad}/maps", "garbage.mrc"),
    # --- preprocess
    case("preprocess-truncated-mrc", "preprocess {bad}/truncated.mrc -o {out}", "truncated.mrc"),
    case("preprocess-short-data-mrc", "preprocess {bad}/short_data.mrc -o {out}", "short_data"),
    case("preprocess-garbage-mrc", "preprocess {bad}/garbage.mrc -o {out}", "garbage.mrc"),
    case("preprocess-complex-mrc", "preprocess {bad}/complex.mrc -o {out}", "complex.mrc", "mode"),
    case("preprocess-zarr-no-metadata", "preprocess {bad}/bare.zarr -o {out}", "bare.zarr"),
    case("preprocess-missing-input", "preprocess {bad}/nothing.mrc -o {out}", "nothing.mrc"),
    case("preprocess-voxel-nan", PRE + " --voxel-size-angstrom nan", "--voxel-size-angstrom"),
    case("preprocess-voxel-zero", PRE + " --voxel-size-angstrom 0", "--voxel-size-angstrom", "0"),
    case("preprocess-lowpass-negative", PRE + " --lowpass-angstrom -8", "--lowpass-angstrom"),
    case("preprocess-highpass-inf", PRE + " --highpass-angstrom inf", "--highpass-angstrom"),
    case(
        "preprocess-input-voxel-negative",
        PRE + " --input-voxel-size-angstrom -1",
        "--input-voxel-size-angstrom",
    ),
    case("preprocess-out-is-a-file", "preprocess {tomo} -o {file}", "{file}"),
    case("preprocess-out-under-a-file", "preprocess {tomo} -o {file}/sub", "{file}"),
    case("preprocess-disk-full", PRE, "{out}", "No space left", setup="disk_full"),
    # --- make-masks
    case(
        "masks-truncated-star",
        "make-masks {bad}/truncated.star --tomograms {tomos} --classes {classes} -o {out}",
        "truncated.star",
    ),
    case(
        "masks-garbage-star",
        "make-masks {bad}/garbage.star --tomograms {tomos} --classes {classes} -o {out}",
        "garbage.star",
    ),
    case(
        "masks-garbage-csv",
        "make-masks {bad}/garbage.csv --tomograms {tomos} --classes {classes} -o {out}",
        "garbage.csv",
    ),
    case(
        "masks-garbage-tbl",
        "make-masks {bad}/garbage.tbl --tomograms {tomos} --classes {classes} -o {out}",
        "garbage.tbl",
    ),
    case(
        "masks-garbage-classes",
        "make-masks {star} --tomograms {tomos} --classes {bad}/classes.csv -o {out}",
        "classes.csv",
    ),
    case(
        "masks-garbage-copick-config",
        "make-masks {bad}/copick/config.json --tomograms {tomos} --classes {classes} -o {out}",
        "config.json",
    ),
    case(
        "masks-garbage-tomograms-star",
        "make-masks {star} --tomograms {bad}/tomograms.star --classes {classes} -o {out}",
        "tomograms.star",
    ),
    case("masks-radius-scale-zero", MASKS + " --radius-scale 0", "--radius-scale", "0"),
    case("masks-radius-scale-nan", MASKS + " --radius-scale nan", "--radius-scale", "nan"),
    case("masks-threshold-huge", MASKS + " --template-threshold 5", "--template-threshold", "5"),
    case(
        "masks-radius-negative",
        "make-masks {star} --tomograms {tomos} --radius-angstrom -3 -o {out}",
        "--radius-angstrom",
        "-3",
    ),
    case(
        "masks-pixel-size-zero",
        MASKS + " --coords-pixel-size-angstrom 0",
        "--coords-pixel-size-angstrom",
    ),
    case("masks-voxel-inf", MASKS + " --voxel-size-angstrom inf", "--voxel-size-angstrom", "inf"),
    case("masks-out-is-a-file", MASKS.replace("{out}", "{file}"), "{file}"),
    case(
        "masks-classes-missing-parent",
        MASKS.replace("{classes}", "{bad}/gone/classes.csv"),
        "gone/classes.csv",
    ),
    # --- train
    case("train-threads-negative", TRAIN + " --threads -1", "--threads", "-1"),
    case("train-threads-zero", TRAIN + " --threads 0", "--threads", "0"),
    case("train-jitter-negative", TRAIN + " --jitter-voxels -3", "--jitter-voxels", "-3"),
    case("train-model-option-widths", TRAIN + " --model-option widths=8,8", "--model-option"),
    case("train-model-option-unknown", TRAIN + " --model-option depth=3", "--model-option"),
    case("train-lr-inf", TRAIN + " --lr inf", "--lr", "inf"),
    case("train-lr-nan", TRAIN + " --lr nan", "--lr", "nan"),
    case("train-lr-zero", TRAIN + " --lr 0", "--lr", "0"),
    case("train-batch-zero", TRAIN + " --batch-size 0", "--batch-size", "0"),
    case("train-patch-huge", TRAIN + " --patch-size 4096", "--patch-size", "4096"),
    case("train-epochs-zero", TRAIN + " --epochs 0", "--epochs", "0"),
    case("train-steps-zero", TRAIN + " --steps-per-epoch 0", "--steps-per-epoch", "0"),
    case("train-val-patches-zero", TRAIN + " --max-val-patches 0", "--max-val-patches", "0"),
    case("train-voxel-negative", TRAIN + " --voxel-size-angstrom -1", "--voxel-size-angstrom"),
    case("train-seed-huge", TRAIN + " --seed 18446744073709551616", "--seed"),
    case("train-epochs-400-digits", TRAIN + " --epochs -" + "9" * 400, "--epochs"),
    case("train-patch-zero", TRAIN + " --patch-size 0", "--patch-size", "0"),
    case("train-val-fraction-nan", TRAIN + " --val-fraction nan", "--val-fraction", "nan"),
    case("train-background-negative", TRAIN + " --background-fraction -0.1", "--background"),
    case("train-max-minutes-nan", TRAIN + " --max-minutes nan", "--max-minutes", "nan"),
    case("train-max-minutes-negative", TRAIN + " --max-minutes -5", "--max-minutes", "-5"),
    case("train-patience-negative", TRAIN + " --patience -1", "--patience", "-1"),
    case("train-ema-nan", TRAIN + " --ema nan", "--ema", "nan"),
    case("train-hard-negatives-huge", TRAIN + " --hard-negatives 3", "--hard-negatives", "3"),
    case(
        "train-labels-not-in-classes",
        TRAIN.replace("{label}", "{bad}/labels_9/tomo_01.mrc"),
        "labels_9",
        "9",
    ),
    case(
        "train-labels-truncated",
        TRAIN.replace("{label}", "{bad}/labels_cut/tomo_01.mrc"),
        "labels_cut",
    ),
    case("train-out-is-a-file", TRAIN.replace("{out}", "{file}"), "{file}"),
    case(
        "train-resume-truncated-checkpoint",
        TRAIN + " --resume",
        "checkpoint_last.pt",
        setup="truncated_checkpoint",
    ),
    # --- segment
    case("segment-out-is-a-file", "segment {tomo} --model {model} -o {file}", "{file}"),
    case("segment-out-under-a-file", "segment {tomo} --model {model} -o {file}/x", "{file}"),
    case(
        "segment-model-unknown-option",
        "segment {tomo} --model {bad}/model_unknown_option -o {out}",
        "model_unknown_option",
        "bogus",
    ),
    case(
        "segment-model-string-options",
        "segment {tomo} --model {bad}/model_string_options -o {out}",
        "model_string_options",
        "options",
    ),
    case(
        "segment-model-garbage-config",
        "segment {tomo} --model {bad}/model_garbage_config -o {out}",
        "model_garbage_config",
    ),
    case(
        "segment-model-config-is-run-json",
        "segment {tomo} --model {bad}/model_run_json -o {out}",
        "model_run_json",
    ),
    case(
        "segment-model-truncated-weights",
        "segment {tomo} --model {bad}/model_truncated_weights -o {out}",
        "model_truncated_weights",
    ),
    case(
        "segment-slurm-step-zero",
        SEG + " --shard 0/2",
        "SLURM_ARRAY_TASK_STEP",
        "0",
        env={
            "SLURM_ARRAY_TASK_ID": "0",
            "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": "1",
            "SLURM_ARRAY_TASK_STEP": "0",
        },
    ),
    case("segment-threads-zero", SEG + " --threads 0", "--threads", "0"),
    case("segment-batch-zero", SEG + " --batch-size 0", "--batch-size", "0"),
    case("segment-overlap-negative", SEG + " --overlap -1", "--overlap", "-1"),
    case("segment-patch-zero", SEG + " --patch-size 0", "--patch-size", "0"),
    case("segment-complex-tomogram", "segment {bad}/complex.mrc --model {model} -o {out}", "mode"),
    case(
        "segment-zarr-no-metadata",
        "segment {bad}/bare.zarr --model {model} -o {out}",
        "bare.zarr",
    ),
    case("segment-disk-full", SEG, "{out}", "No space left", setup="disk_full"),
    case("segment-read-only", SEG, "{out}", "Permission denied", setup="read_only"),
    case("segment-model-missing-parent", "segment {tomo} --model {out}/a/b -o {out}", "{out}/a/b"),
    # --- cluster-picks
    case("picks-min-size-nan", PICK + " --min-size-fraction nan", "--min-size-fraction", "nan"),
    case("picks-min-size-negative", PICK + " --min-size-fraction -1", "--min-size-fraction"),
    case("picks-relative-inf", PICK + " --relative-min-size inf", "--relative-min-size", "inf"),
    case("picks-min-score-nan", PICK + " --min-score nan", "--min-score", "nan"),
    case("picks-voxel-zero", PICK + " --voxel-size-angstrom 0", "--voxel-size-angstrom", "0"),
    case(
        "picks-radius-nan",
        "cluster-picks {label} --radius-angstrom nan -o {out}/p.star",
        "--radius-angstrom",
        "nan",
    ),
    case(
        "picks-pixel-size-negative",
        PICK + " --coords-pixel-size-angstrom -2",
        "--coords-pixel-size-angstrom",
        "-2",
    ),
    case(
        "picks-labels-not-in-classes",
        PICK.replace("{label}", "{bad}/labels_9/tomo_01.mrc"),
        "labels_9",
        "9",
    ),
    case(
        "picks-truncated-map", PICK.replace("{label}", "{bad}/labels_cut/tomo_01.mrc"), "labels_cut"
    ),
    case(
        "picks-thresholds-garbage",
        PICK + " --thresholds {bad}/garbage.csv",
        "garbage.csv",
    ),
    case("picks-output-exists", PICK, "{out}/picks.star", "--overwrite", setup="old_outputs"),
    case("picks-out-under-a-file", "cluster-picks {label} -o {file}/picks.star", "{file}"),
    case("picks-disk-full", PICK, "{out}/picks.star", "No space left", setup="disk_full"),
    # --- convert-picks
    case(
        "convert-truncated-star",
        "convert-picks {bad}/truncated.star --tomograms {tomos} -o {out}/p.csv",
        "truncated.star",
    ),
    case("convert-garbage-tbl", "convert-picks {bad}/garbage.tbl -o {out}/p.csv", "garbage.tbl"),
    case("convert-garbage-csv", "convert-picks {bad}/garbage.csv -o {out}/p.star", "garbage.csv"),
    case("convert-binary-star", "convert-picks {bad}/garbage.star -o {out}/p.csv", "garbage.star"),
    case(
        "convert-garbage-copick",
        "convert-picks {bad}/copick/config.json -o {out}/p.csv",
        "config.json",
    ),
    case(
        "convert-pixel-size-nan",
        CONVERT + " --coords-pixel-size-angstrom nan",
        "--coords-pixel-size-angstrom",
    ),
    case("convert-out-is-a-folder", "convert-picks {csv} -o {bad}/folder.csv", "folder.csv"),
    case("convert-out-under-a-file", "convert-picks {star} -o {file}/p.csv", "{file}"),
    case("convert-output-exists", CONVERT, "{out}/picks.csv", "--overwrite", setup="old_outputs"),
    case("convert-voxel-inf", CONVERT + " --voxel-size-angstrom inf", "--voxel-size-angstrom"),
    case("convert-disk-full", CONVERT, "{out}/picks.csv", "No space left", setup="disk_full"),
    case("convert-read-only", CONVERT, "{out}/picks.csv", "Permission", setup="read_only"),
    # --- evaluate
    case("evaluate-tolerance-nan", EVAL + " --tolerance-fraction nan", "--tolerance-fraction"),
    case("evaluate-tolerance-zero", EVAL + " --tolerance-fraction 0", "--tolerance-fraction"),
    case("evaluate-beta-inf", EVAL + " --beta inf", "--beta", "inf"),
    case("evaluate-beta-zero", EVAL + " --beta 0", "--beta", "0"),
    case(
        "evaluate-radius-zero",
        "evaluate {csv} {csv} --radius-angstrom 0 --voxel-size-angstrom 20",
        "--radius-angstrom",
    ),
    case(
        "evaluate-pixel-size-nan",
        EVAL + " --coords-pixel-size-angstrom nan",
        "--coords-pixel-size-angstrom",
    ),
    case("evaluate-overlay-slices-zero", EVAL + " --overlay-slices 0", "--overlay-slices", "0"),
    case("evaluate-voxel-nan", EVAL + " --voxel-size-angstrom nan", "--voxel-size-angstrom"),
    case(
        "evaluate-truncated-truth",
        "evaluate {csv} {bad}/truncated.star --classes {classes} --tomograms {tomos}",
        "truncated.star",
    ),
    case("evaluate-report-is-a-file", EVAL + " -o {file}", "{file}"),
    case(
        "evaluate-truth-missing-parent",
        "evaluate {csv} {out}/x/truth.csv --classes {classes}",
        "truth.csv",
    ),
    case(
        "evaluate-labels-not-in-classes",
        "evaluate --labels-pred {bad}/labels_9/tomo_01.mrc --labels-true {label} "
        "--classes {classes}",
        "labels_9",
        "9",
    ),
    # --- demo
    case("demo-minutes-nan", "demo {out} --minutes nan", "--minutes", "nan"),
    case("demo-minutes-negative", "demo {out} --minutes -1", "--minutes", "-1"),
    case("demo-shape-tiny", DEMO + " --shape 2,2,2", "--shape", "2,2,2"),
    case("demo-patch-zero", DEMO + " --patch-size 0", "--patch-size", "0"),
    case("demo-patch-larger-than-shape", DEMO + " --patch-size 512", "--patch-size", "512"),
    case("demo-epochs-zero", "demo {out} --epochs 0", "--epochs", "0"),
    case("demo-steps-zero", "demo {out} --steps-per-epoch 0", "--steps-per-epoch", "0"),
    case("demo-seed-negative", "demo {out} --seed -1", "--seed", "-1"),
    case("demo-into-a-file", "demo {file}", "{file}"),
]

COMMANDS = {c.argv[0] for c in CASES}
# The lines most cases add one bad value to (demo's takes minutes; its cases fail first).
GOOD_LINES = {
    "simulate": SIM,
    "preprocess": PRE,
    "make-masks": MASKS,
    "train": TRAIN,
    "segment": SEG,
    "cluster-picks": PICK,
    "convert-picks": CONVERT,
    "evaluate": EVAL,
}


def test_the_campaign_covers_every_command_with_many_inputs():
    from cryocaps.cli.main import COMMANDS as APP_COMMANDS

    assert COMMANDS == {name for name, _ in APP_COMMANDS}
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


def test_the_readme_gives_the_campaign_size():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{len(CASES)} bad inputs across all nine commands" in " ".join(readme.split())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    """The shared inputs: a tiny simulated data set, a model, and bad files of every kind."""
    root = tmp_path_factory.mktemp("hostile")
    sim = root / "sim"
    result = CliRunner().invoke(
        app, ["simulate", str(sim), *BASE_SIMULATE, "--seed", "3", "--no-distractors", "-q"]
    )
    assert result.exit_code == 0, result.output
    paths = {
        "sim": sim,
        "tomo": sim / "tomograms" / "tomo_01.mrc",
        "tomos": sim / "tomograms",
        "label": sim / "labels" / "tomo_01.mrc",
        "star": sim / "particles.star",
        "csv": sim / "particles.csv",
        "classes": sim / "classes.csv",
        "model": _tiny_model(root / "model", sim / "classes.csv"),
        "bad": root / "bad",
    }
    _bad_files(paths)
    return paths


def _tiny_model(folder: Path, classes_csv: Path) -> Path:
    import pandas as pd
    import torch

    from cryocaps.modelfile import save_model
    from cryocaps.models import create_model

    classes = pd.read_csv(classes_csv)[["label", "name", "radius_angstrom"]]
    torch.manual_seed(0)
    model = create_model("unet", len(classes) + 1, widths=(4, 4, 4))
    metadata = {
        "classes": classes.to_dict(orient="records"),
        "voxel_size_angstrom": 20.0,
        "patch_size": 16,
        "normalization": {"method": "percentile_zscore"},
    }
    return save_model(folder, model, metadata)


def _bad_files(paths: dict[str, Path]) -> None:
    """Every kind of broken input, in ``paths["bad"]``."""
    bad = paths["bad"]
    bad.mkdir()
    rng = np.random.default_rng(0)
    tomo_bytes = paths["tomo"].read_bytes()
    (bad / "truncated.mrc").write_bytes(tomo_bytes[:700])  # inside the 1024-byte header
    (bad / "short_data.mrc").write_bytes(tomo_bytes[: 1024 + (len(tomo_bytes) - 1024) // 2])
    (bad / "garbage.mrc").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with mrcfile.new(bad / "complex.mrc") as mrc:  # mode 4: complex64
        mrc.set_data(np.ones((16, 16, 16), dtype=np.complex64))
        mrc.voxel_size = 20.0
    with mrcfile.open(paths["label"]) as mrc:
        labels = mrc.data.copy()
        voxel_size = mrc.voxel_size.copy()
    labels[:4, :4, :4] = 9  # no class 9 in classes.csv
    (bad / "labels_9").mkdir()
    with mrcfile.new(bad / "labels_9" / "tomo_01.mrc") as mrc:
        mrc.set_data(labels)
        mrc.voxel_size = voxel_size
    (bad / "labels_cut").mkdir()
    label_bytes = paths["label"].read_bytes()
    (bad / "labels_cut" / "tomo_01.mrc").write_bytes(label_bytes[: len(label_bytes) - 100])
    (bad / "folder.csv").mkdir()  # an output name taken by a folder
    (bad / "bare.zarr").mkdir()  # an OME-Zarr image without its metadata
    (bad / "bare.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    star = paths["star"].read_text()
    (bad / "truncated.star").write_text(star[: int(len(star) * 0.6)] + "\x00\x17")
    (bad / "garbage.star").write_bytes(b"data_\nloop_\n_rlnCoordinateX #1\n\xff\xfe\x00abc\n")
    (bad / "garbage.csv").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(300))
    (bad / "garbage.tbl").write_text("1 1 0 0 0 0 nan one 2\n3 4\n")
    (bad / "classes.csv").write_text("label,name,radius_angstrom\n1,globule,big\n2,,-3\n")
    (bad / "tomograms.star").write_text("data_global\nloop_\n_rlnTomoName #1\n")
    (bad / "copick").mkdir()
    (bad / "copick" / "config.json").write_text('{"name": "project", "pickable_objects": [')
    (bad / "maps").mkdir()
    (bad / "maps" / "garbage.mrc").write_bytes(rng.bytes(3000))
    model = paths["model"]
    config = json.loads((model / "config.json").read_text())
    variants = {
        "model_unknown_option": {**config, "options": {**config["options"], "bogus": 1}},
        "model_string_options": {**config, "options": "widths"},
        "model_garbage_config": None,
        "model_run_json": {"command": "cryocaps train", "results": {}},
        "model_truncated_weights": config,
    }
    for name, content in variants.items():
        folder = bad / name
        folder.mkdir()
        weights = (model / "model.pt").read_bytes()
        if name == "model_truncated_weights":
            weights = weights[: len(weights) // 3]
        (folder / "model.pt").write_bytes(weights)
        text = "{ garbage" if content is None else json.dumps(content)
        (folder / "config.json").write_text(text)


def old_outputs(out: Path, monkeypatch) -> None:
    """Outputs of an earlier run at the names the command would write."""
    for name in ("classes.csv", "picks.star", "picks.csv", "run.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"{name} of an earlier run\n")


def disk_full(out: Path, monkeypatch) -> None:
    """Every atomic write fails half-way with ENOSPC, as on a full disk."""
    from cryocaps.io import files, particles, volumes

    real_atomic_path = files.atomic_path

    @contextlib.contextmanager
    def full(path, overwrite=False):
        with real_atomic_path(path, overwrite) as tmp:
            yield tmp
            size = tmp.stat().st_size if tmp.exists() else 0
            with open(tmp, "r+b") as handle:  # what a full disk keeps of the file
                handle.truncate(size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for module in (files, particles, volumes):
        monkeypatch.setattr(module, "atomic_path", full)


def read_only(out: Path, monkeypatch) -> None:
    """The output folder refuses new files, as a read-only folder does for a user who is not
    root (the tests run as root here, where chmod would not stop a write)."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def refusing_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(out):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refusing_mkstemp)


def truncated_checkpoint(out: Path, monkeypatch) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint_last.pt").write_bytes(b"PK\x03\x04 not a whole checkpoint")


SETUPS = {f.__name__: f for f in (old_outputs, disk_full, read_only, truncated_checkpoint)}


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: size and modification time (files), or "dir"."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            key = str(path)
            if path.is_dir():
                state[key] = ("dir",)
            else:
                stat = path.stat()
                state[key] = (stat.st_size, stat.st_mtime_ns)
    return state


# --------------------------------------------------------------------------- the campaign


@pytest.mark.parametrize("hostile", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(hostile, world, tmp_path, monkeypatch):
    monkeypatch.setitem(common._state, "verbose", False)  # an earlier --verbose test sticks
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder\n")
    places = {**{k: str(v) for k, v in world.items()}, "out": str(tmp_path / "out")}
    places["file"] = str(a_file)
    if hostile.setup:
        SETUPS[hostile.setup](tmp_path / "out", monkeypatch)
    for key, value in hostile.env.items():
        monkeypatch.setenv(key, value)
    argv = [arg.format(**places) for arg in hostile.argv]
    names = [name.format(**places) for name in hostile.names]
    before = snapshot(tmp_path, world["sim"], world["bad"], world["model"])

    result = CliRunner().invoke(app, argv)

    output = result.output
    assert "Traceback" not in output, output
    assert "Usage:" not in output, output  # the one line only, not click's usage and hint
    assert result.exit_code == 2, (argv, result.exception, output)
    error_lines = [line for line in output.splitlines() if "Error" in line]
    assert len(error_lines) == 1, output
    line = error_lines[0]
    for name in names:
        assert name in line, (name, line)
    assert "no check caught" not in line, line
    after = snapshot(tmp_path, world["sim"], world["bad"], world["model"])
    added = sorted(after.keys() - before.keys())
    if hostile.setup in ("disk_full", "read_only"):  # the write made its folder; no file in it
        added = [path for path in added if after[path] != ("dir",)]
    assert added == [], "added"
    assert sorted(before.keys() - after.keys()) == [], "removed"
    assert [k for k in before.keys() & after.keys() if before[k] != after[k]] == [], "changed"


@pytest.mark.parametrize("command", GOOD_LINES)
def test_the_lines_work_without_the_bad_part(command, world, tmp_path, monkeypatch):
    """Each case fails for what it adds to these lines, not because the lines are wrong."""
    places = {**{k: str(v) for k, v in world.items()}, "out": str(tmp_path / "out")}
    argv = [arg.format(**places) for arg in GOOD_LINES[command].split()]
    before = snapshot(world["sim"], world["bad"], world["model"])
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert snapshot(world["sim"], world["bad"], world["model"]) == before
    if command != "evaluate":  # evaluate prints its scores; the others write files
        assert any(path.is_file() for path in (tmp_path / "out").rglob("*"))


def test_disk_full_leaves_no_file_under_the_final_name(world, tmp_path, monkeypatch):
    """The patched writer really wrote half a file before failing, and the half is gone."""
    seen = []
    from cryocaps.io import files

    real_replace = os.replace

    def watching_replace(source, target):
        seen.append(target)
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", watching_replace)
    disk_full(tmp_path / "out", monkeypatch)
    out = tmp_path / "out" / "picks.csv"
    result = CliRunner().invoke(app, ["convert-picks", str(world["csv"]), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert seen == []  # never renamed into place
    assert not out.exists()
    assert not list(out.parent.glob("*"))  # nor a temporary file left behind
    assert str(out) in result.output


def test_verbose_keeps_the_traceback(world, tmp_path, monkeypatch):
    monkeypatch.setitem(common._state, "verbose", False)
    out = tmp_path / "afile"
    out.write_text("x")
    result = CliRunner().invoke(
        app, ["segment", str(world["tomo"]), "--model", str(world["model"]), "-o", str(out), "-v"]
    )
    assert result.exit_code == 2
    assert "Traceback" in result.output


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [
        (ValueError("bad number"), 2, ["cryocaps simulate", "ValueError: bad number", "report"]),
        (OSError(errno.EACCES, "Permission denied", "/data/x.mrc"), 2, ["/data/x.mrc: Perm"]),
        (OSError(errno.EIO, "Input/output error"), 2, ["cryocaps simulate: Input/output"]),
        (MemoryError(), 1, ["cryocaps simulate: out of memory", "--shape"]),
    ],
)
def test_what_no_check_caught_is_still_one_line(raised, code, words, capsys, monkeypatch):
    import typer

    monkeypatch.setitem(common._state, "verbose", False)

    def command():
        raise raised

    with pytest.raises(typer.Exit) as stopped:
        common.handle_errors(command, "simulate")()
    assert stopped.value.exit_code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines


def test_memory_error_names_what_the_command_can_change():
    assert "--shape" in common.memory_message("simulate", MemoryError())
    assert "--batch-size" not in common.memory_message("simulate", MemoryError())
    assert "--batch-size" in common.memory_message("segment", MemoryError("big"))


def test_the_bad_mrc_is_complex_mode_4(world):
    with mrcfile.open(world["bad"] / "complex.mrc", permissive=True) as mrc:
        assert mrc.header.mode == 4
