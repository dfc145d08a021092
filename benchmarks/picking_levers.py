"""Picking rules at defaults: precision, recall and duplicates per class on two simulated sets.

For each set: ``cryocaps simulate`` 5 tomograms, ``make-masks``, ``train`` a model for a fixed
number of steps on tomo_01-03 (so machine load changes the time, not the model),
``segment --probabilities`` tomo_04 (validation) and tomo_05 (test); then every picking variant
below is applied to the same maps and scored with ``cryocaps.evaluation.evaluate_picks``.

    python benchmarks/picking_levers.py                 # both sets, U-Net, 800 steps (~1 h loaded)
    python benchmarks/picking_levers.py --steps 200 --sets procedural   # a quick look
    python benchmarks/picking_levers.py --work DIR      # reuse DIR's data, models and maps
    python benchmarks/picking_levers.py --vs-deepfinder benchmarks/work/vs_deepfinder
        # the models a vs_deepfinder.py run trained (every set, every cryocaps model):
        # segment its validation and test tomograms with --probabilities, then score the variants

Variants: the old default (components, min size 0.2 of the class sphere), the default (that
and 0.5 of the class's typical pick in the map), larger size limits, a minimum mean
probability, and probabilities blurred per class (sigma a fraction of the radius) before the
argmax, alone and with a size limit. Results: DIR/picking_levers.json and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cryocaps.evaluation import evaluate_picks
from cryocaps.io.class_table import read_classes
from cryocaps.io.volumes import read_probabilities, read_tomogram
from cryocaps.picking import pick_particles

HERE = Path(__file__).resolve().parent
STRUCTURES = HERE.parent.parent / "shared" / "data" / "structures"
SETS = {
    "procedural": ["--snr", "0.4", "--seed", "11"],
    "structures": [
        "--snr", "0.15", "--seed", "12", "--structures", str(STRUCTURES),
        "--classes-from", "3gl1,3j9i,1qvr,4v4r_30S", "--crowding", "0.2",
    ],
}  # fmt: skip
TOMOGRAMS = ("tomo_04", "tomo_05")


def cryocaps(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cryocaps", *args], check=True)


def prepare(folder: Path, options: list[str], model: str, steps: int) -> None:
    """Data, masks, model and the two segmentations (each skipped when already there)."""
    data, masks, run = folder / "data", folder / "masks", folder / f"run_{model}"
    tomograms = data / "tomograms"
    if not (data / "particles.csv").is_file():
        cryocaps("simulate", str(data), "--n-tomograms", "5", "--shape", "64,160,160", *options)
    if not masks.is_dir():
        cryocaps("make-masks", str(data / "particles.star"), "--tomograms", str(tomograms),
                 "--classes", str(data / "classes.csv"), "-o", str(masks))  # fmt: skip
    if not (run / "model.pt").is_file():
        train = [arg for i in (1, 2, 3) for arg in ("-t", str(tomograms / f"tomo_0{i}.mrc"))]
        labels = [arg for i in (1, 2, 3) for arg in ("-l", str(masks / f"tomo_0{i}_labels.mrc"))]
        cryocaps("train", *train, *labels, "--classes", str(masks / "classes.csv"),
                 "--model", model, "--epochs", str(max(1, steps // 100)), "--steps-per-epoch",
                 str(min(steps, 100)), "--seed", "0", "-o", str(run), "--overwrite")  # fmt: skip
    segmentation = folder / f"seg_{model}"
    if not (segmentation / "tomo_05_probs.mrc").is_file():
        cryocaps("segment", *(str(tomograms / f"{t}.mrc") for t in TOMOGRAMS), "--model", str(run),
                 "--probabilities", "-o", str(segmentation), "--overwrite")  # fmt: skip


def blurred_labels(probabilities: np.ndarray, classes, voxel_size: float, fraction: float):
    """Argmax of the probabilities blurred per class (sigma = fraction x class radius)."""
    labels = np.zeros(probabilities.shape[1:], np.uint8)
    for particle_class in classes:
        sigma = fraction * particle_class.radius_voxels(voxel_size)
        blurred = [ndimage.gaussian_filter(channel.astype(np.float32), sigma)
                   for channel in probabilities]  # fmt: skip
        labels[np.argmax(blurred, axis=0) == particle_class.label] = particle_class.label
    return labels


def variants(labels, probabilities, classes, voxel_size) -> dict[str, tuple[np.ndarray, dict]]:
    blur_50 = blurred_labels(probabilities, classes, voxel_size, 0.5)
    blur_35 = blurred_labels(probabilities, classes, voxel_size, 0.35)
    sphere_only = {"relative_min_size": 0.0}  # the default of 0.1.0
    return {
        "min size 0.2 of the sphere (the old default)": (labels, sphere_only),
        "default (0.2 of the sphere + 0.5 of the typical pick)": (labels, {}),
        "min size 0.5": (labels, {"min_size_fraction": 0.5, **sphere_only}),
        "min score 0.5": (labels, {"min_score": 0.5, **sphere_only}),
        "blur 0.5 r": (blur_50, sphere_only),
        "blur 0.35 r": (blur_35, sphere_only),
        "blur 0.35 r + min size 0.5": (blur_35, {"min_size_fraction": 0.5, **sphere_only}),
        "blur 0.5 r + min size 0.5": (blur_50, {"min_size_fraction": 0.5, **sphere_only}),
    }


def score_set(folder: Path, model: str) -> dict:
    classes = read_classes(folder / "data" / "classes.csv")
    truth = pd.read_csv(folder / "data" / "particles.csv")
    results: dict[str, dict] = {}
    for tomo in TOMOGRAMS:
        label_file = read_tomogram(folder / f"seg_{model}" / f"{tomo}_labels.mrc")
        voxel_size = label_file.voxel_size_angstrom
        labels = np.asarray(label_file.data)
        probs_path = folder / f"seg_{model}" / f"{tomo}_probs.mrc"
        probabilities = np.asarray(read_probabilities(probs_path, voxel_size), np.float32)
        for name, (label_map, options) in variants(labels, probabilities, classes,
                                                   voxel_size).items():  # fmt: skip
            picks = pick_particles(label_map, classes, voxel_size, probabilities, tomo_name=tomo,
                                   **options)  # fmt: skip
            scores = evaluate_picks(picks, truth[truth.tomo == tomo], classes, voxel_size,
                                    tomograms=[tomo])  # fmt: skip
            results.setdefault(name, {})[tomo] = scores
    return results


def table(set_name: str, results: dict) -> str:
    first = next(iter(results.values()))[TOMOGRAMS[0]]["classes"]
    names = list(first)
    header = "| variant | " + " | ".join(names) + " | macro F1 (val, test) |"
    lines = [f"### {set_name}", "", header, "|---" * (len(names) + 2) + "|"]
    for variant, per_tomogram in results.items():
        cells = []
        for name in names:
            rows = [per_tomogram[t]["classes"][name] for t in TOMOGRAMS]
            tp = sum(r["tp"] for r in rows)
            precision = tp / max(1, sum(r["tp"] + r["fp"] for r in rows))
            recall = tp / max(1, sum(r["tp"] + r["fn"] for r in rows))
            duplicates = sum(r["duplicates"] for r in rows)
            cells.append(f"P {precision:.2f} R {recall:.2f} dup {duplicates}")
        macro = ", ".join(f"{per_tomogram[t]['macro']['f1']:.2f}" for t in TOMOGRAMS)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {macro} |")
    return "\n".join(lines)


def segment_vs_deepfinder_models(work: Path, models: list[str]) -> list[tuple[Path, str]]:
    """(set folder, model) of every cryocaps model a vs_deepfinder.py run left in ``work``,
    with its validation and test tomograms segmented with --probabilities into
    ``<set>/seg_<model>`` (skipped when there)."""
    found = []
    for folder in sorted(p for p in work.iterdir() if (p / "data" / "particles.csv").is_file()):
        for model in models:
            run = folder / f"cryocaps-{model}" / "model"
            if not (run / "model.pt").is_file():
                continue
            segmentation = folder / f"seg_{model}"
            if not (segmentation / "tomo_05_probs.mrc").is_file():
                tomograms = [str(folder / "data" / "tomograms" / f"{t}.mrc") for t in TOMOGRAMS]
                cryocaps("segment", *tomograms, "--model", str(run), "--probabilities",
                         "-o", str(segmentation), "--overwrite")  # fmt: skip
            found.append((folder, model))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work" / "picking_levers")
    parser.add_argument("--sets", default=",".join(SETS), help="procedural,structures")
    parser.add_argument("--model", default="unet", choices=["unet", "ucaps", "ucaps-fast"])
    parser.add_argument("--steps", type=int, default=800, help="training steps (fixed)")
    parser.add_argument(
        "--vs-deepfinder",
        type=Path,
        default=None,
        help="score the models of this vs_deepfinder.py --work folder instead of training",
    )
    parser.add_argument(
        "--models", default="ucaps,ucaps-fast,unet", help="with --vs-deepfinder: which models"
    )
    args = parser.parse_args(argv)
    report = {}
    if args.vs_deepfinder is not None:
        for folder, model in segment_vs_deepfinder_models(
            args.vs_deepfinder, args.models.split(",")
        ):
            name = f"{folder.name} {model}"
            report[name] = score_set(folder, model)
            print(table(name, report[name]), flush=True)
        (args.vs_deepfinder / "picking_levers.json").write_text(json.dumps(report, indent=1))
        return 0
    for set_name in args.sets.split(","):
        folder = args.work / set_name
        prepare(folder, SETS[set_name], args.model, args.steps)
        report[set_name] = score_set(folder, args.model)
        print(table(set_name, report[set_name]), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "picking_levers.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
