"""Training that does not learn "noise = the faint class": patch sampling and partial annotations.

One small, CPU-cheap set where the U-Net can run away over the background: three classes
drawn here as density maps (a hollow barrel of point-like subunits, faint; a two-lobed
globule; a small compact particle), ``cryocaps simulate`` at low SNR, 3 training tomograms
and 1 test tomogram. Each run: ``make-masks`` from all or a fraction of the training
particles (random per tomogram and class), ``train`` a fixed number of steps with the options
given, ``segment`` the test tomogram, ``cluster-picks`` at defaults, ``evaluate`` against all
of its particles, and each class's share of the background voxels (voxels labelled c outside
every true particle / background voxels, from simulate's label map) next to the fraction of
the tomogram that class's particles fill. Every run is appended to
``benchmarks/results/sampling.json``.

    python benchmarks/sampling.py --work benchmarks/work/sampling --name baseline
    python benchmarks/sampling.py --work W --name mined --train-option=--mined-negatives=0.5
    python benchmarks/sampling.py --work W --name partial30-unknown --annotated-fraction 0.3 \
        --unannotated unknown
    python benchmarks/sampling.py --table           # the runs in sampling.json as a table
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from _bench import cryocaps_cmd, machine_info, repeat, run_measured, say, utc_now

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "sampling.json"
VOXEL_ANGSTROM = 10.0
MAP_VOXEL_ANGSTROM = 5.0
STEPS_PER_EPOCH = 100
SCORES = ("precision", "recall", "f1", "tp", "fp", "fn")
SIMULATE_OPTIONS = ["--n-tomograms", "4", "--shape", "64,160,160", "--snr", "0.25", "--seed", "3"]


# --------------------------------------------------------------------------- the classes


def _blob(grid, centre, sigma: float) -> np.ndarray:
    return np.exp(-((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) / (2 * sigma**2))


def class_maps(box: int = 40) -> dict[str, np.ndarray]:
    """Name -> (box³) density at 5 Å voxels: pointbarrel, twolobe, small."""
    grid = np.indices((box, box, box), dtype=np.float32) - (box - 1) / 2
    barrel = np.zeros((box,) * 3, np.float32)
    for ring, z in enumerate((-7.5, -2.5, 2.5, 7.5)):  # four rings of 7 subunits, 50 Å apart
        for k in range(7):
            angle = 2 * math.pi * (k + 0.5 * ring) / 7
            centre = (z, 9 * math.sin(angle), 9 * math.cos(angle))
            barrel += _blob(grid, centre, 1.3)
    twolobe = _blob(grid, (0, 0, -5), 3.6) + 0.8 * _blob(grid, (0, 2, 6), 3.0)
    small = _blob(grid, (0, 0, 0), 2.6)
    return {"pointbarrel": barrel, "twolobe": twolobe, "small": small}


def setup(work: Path) -> Path:
    """The class maps and the simulated set (kept when made with the same options)."""
    import mrcfile

    data = work / "data"
    stamp = work / "simulate_options.json"
    if stamp.exists() and json.loads(stamp.read_text()) == SIMULATE_OPTIONS:
        return data
    structures = work / "structures"
    structures.mkdir(parents=True, exist_ok=True)
    for name, density in class_maps().items():
        with mrcfile.new(structures / f"{name}.mrc", overwrite=True) as mrc:
            mrc.set_data(density.astype(np.float32))
            mrc.voxel_size = MAP_VOXEL_ANGSTROM
    say(f"cryocaps simulate {' '.join(SIMULATE_OPTIONS)}")
    run_measured(
        cryocaps_cmd(
            "simulate", data, *SIMULATE_OPTIONS, "--structures", structures,
            "--voxel-size-angstrom", VOXEL_ANGSTROM, "--overwrite",
        ),
        work / "logs" / "simulate.log",
    )  # fmt: skip
    stamp.write_text(json.dumps(SIMULATE_OPTIONS))
    return data


# --------------------------------------------------------------------------- one run


def annotated_particles(data: Path, train_names: list[str], fraction: float, seed: int, out: Path):
    """particles.csv of the training tomograms, ``fraction`` of each tomogram's classes kept."""
    import pandas as pd

    table = pd.read_csv(data / "particles.csv")
    table = table[table["tomo"].astype(str).isin(train_names)]
    rng = np.random.default_rng(seed)
    kept = []
    for _, group in table.groupby(["tomo", "class_name"]):
        n = max(1, int(round(fraction * len(group))))
        kept.append(group.iloc[np.sort(rng.permutation(len(group))[:n])])
    table = pd.concat(kept).sort_index()
    table.to_csv(out, index=False)
    return len(table)


def background_shares(label_map: Path, truth_map: Path, classes) -> dict:
    """Per class: predicted voxels outside true particles / background voxels, and the
    fraction of the tomogram that class's true particles fill."""
    from cryocaps.evaluation import background_counts
    from cryocaps.io.volumes import read_tomogram

    predicted = np.asarray(read_tomogram(label_map, check_finite=False).data).view(np.uint8)
    truth = np.asarray(read_tomogram(truth_map, check_finite=False).data).view(np.uint8)
    on_background = background_counts(predicted, truth, classes.n_labels)
    n_background = int(np.count_nonzero(truth == 0))
    return {
        c.name: {
            "background_share": float(on_background[c.label] / n_background),
            "particle_fraction": float((truth == c.label).mean()),
            "predicted_fraction": float((predicted == c.label).mean()),
        }
        for c in classes
    }


def run(args) -> dict:
    work = args.work
    data = setup(work)
    tomograms = sorted((data / "tomograms").glob("*.mrc"))
    train, test = tomograms[:3], tomograms[3]
    folder = work / "runs" / args.name
    logs = folder / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    particles = folder / "annotated.csv"
    n_annotated = annotated_particles(
        data, [t.stem for t in train], args.annotated_fraction, args.seed, particles
    )
    masks = folder / "masks"
    mask_options = ["--unannotated", args.unannotated] if args.unannotated else []
    run_measured(
        cryocaps_cmd(
            "make-masks", particles, *repeat("--tomograms", train), "-o", masks,
            "--classes", data / "classes.csv", "--overwrite", *mask_options,
        ),
        logs / "make_masks.log",
    )  # fmt: skip
    say(f"{args.name}: train {args.model} {args.steps} steps {' '.join(args.train_option)}")
    run_dir = folder / "train"
    if args.reuse and (run_dir / "run.json").exists():  # scoring again: training is done
        return score(args, folder, data, test, run_dir, n_annotated, None)
    train_run = run_measured(
        ["nice", "-n", "10"]
        + cryocaps_cmd(
            "train", *repeat("--tomograms", train), "--labels", masks, "-o", run_dir,
            "--classes", masks / "classes.csv", "--model", args.model,
            "--epochs", args.steps // STEPS_PER_EPOCH, "--steps-per-epoch", STEPS_PER_EPOCH,
            "--seed", args.seed, "--overwrite",
            *args.train_option,
        ),
        logs / "train.log",
    )  # fmt: skip
    return score(args, folder, data, test, run_dir, n_annotated, train_run)


def score(args, folder: Path, data: Path, test: Path, run_dir: Path, n_annotated, train_run):
    """Segment the test tomogram, pick it, evaluate it: the run's entry for sampling.json."""
    from cryocaps.io.class_table import read_classes

    logs = folder / "logs"
    masks = folder / "masks"
    segment_dir = folder / "segment"
    run_measured(
        ["nice", "-n", "10"]
        + cryocaps_cmd("segment", test, "--model", run_dir, "-o", segment_dir, "--overwrite"),
        logs / "segment.log",
    )
    label_map = segment_dir / f"{test.stem}_labels.mrc"
    picks = folder / "picks.csv"
    run_measured(
        cryocaps_cmd(
            "cluster-picks", label_map, "-o", picks, "--classes", masks / "classes.csv",
            "--overwrite",
        ),
        logs / "cluster_picks.log",
    )  # fmt: skip
    report = folder / "evaluate.json"
    run_measured(
        cryocaps_cmd(
            "evaluate", picks, data / "particles.csv", "--classes", masks / "classes.csv",
            "--tomograms", test, "--json",
        ),
        logs / "evaluate.log",
        stdout_path=report,
    )  # fmt: skip
    scores = json.loads(report.read_text())
    classes = read_classes(data / "classes.csv")
    shares = background_shares(label_map, data / "labels" / test.name, classes)
    run_json = json.loads((run_dir / "run.json").read_text())
    return {
        "name": args.name,
        "date_utc": utc_now(),
        "model": args.model,
        "steps_asked": args.steps,
        "seed": args.seed,
        "train_options": args.train_option,
        "annotated_fraction": args.annotated_fraction,
        "unannotated": args.unannotated or "background (today)",
        "n_annotated_training_particles": n_annotated,
        "simulate_options": SIMULATE_OPTIONS,
        "steps": run_json["results"]["steps_done"],
        "train_wall_seconds": round(train_run["wall_seconds"], 1) if train_run else None,
        "macro_f1": scores["macro"]["f1"],
        "classes": {
            name: {
                **{
                    k: scores["classes"][name][k] for k in ("precision", "recall", "f1", "tp", "fp")
                },
                **shares[name],
            }
            for name in shares
        },
        "machine": machine_info(),
    }


# --------------------------------------------------------------------------- results


def append_result(entry: dict) -> None:
    runs = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    runs.append(entry)
    tmp = RESULTS_JSON.with_name(RESULTS_JSON.name + ".part")
    tmp.write_text(json.dumps(runs, indent=2) + "\n")
    tmp.replace(RESULTS_JSON)


def table(runs: list[dict]) -> str:
    """A markdown row per run: macro F1, then per class F1 / precision / background share."""
    names = list(runs[0]["classes"]) if runs else []
    head = "| run | annotated | steps | macro F1 | " + " | ".join(
        f"{n}: F1, P, bg share (particles fill)" for n in names
    )
    lines = [head + " |", "|" + "---|" * (4 + len(names))]
    for r in runs:
        cells = [
            f"{c['f1'] or 0:.2f}, {c['precision'] or 0:.2f}, {100 * c['background_share']:.2f}% "
            f"({100 * c['particle_fraction']:.2f}%)"
            for c in r["classes"].values()
        ]
        lines.append(
            f"| {r['name']} | {r['annotated_fraction']:.0%} {r['unannotated'].split()[0]} | "
            f"{r['steps']} | {r['macro_f1']:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work" / "sampling")
    parser.add_argument("--name", help="name of this run (its folder under WORK/runs)")
    parser.add_argument("--model", default="unet")
    parser.add_argument(
        "--steps",
        type=int,
        default=1200,
        help="training steps (a fixed count, not minutes: the machine is shared, so equal "
        "minutes would not be equal training)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annotated-fraction", type=float, default=1.0)
    parser.add_argument("--unannotated", choices=["unknown", "background"], default=None)
    parser.add_argument(
        "--train-option", action="append", default=[], help="extra train option (repeatable)"
    )
    parser.add_argument("--setup", action="store_true", help="only make the data set")
    parser.add_argument("--table", action="store_true", help="print the runs as a table")
    parser.add_argument("--no-write", action="store_true", help="do not append to sampling.json")
    parser.add_argument(
        "--reuse", action="store_true", help="keep a finished training of this name; score again"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(RESULTS_JSON.read_text())))
        return 0
    if args.setup:
        setup(args.work)
        return 0
    if not args.name:
        raise SystemExit("--name is required for a run")
    args.train_option = [o for opt in args.train_option for o in opt.split("=", 1)]
    entry = run(args)
    print(json.dumps({k: entry[k] for k in ("name", "steps", "macro_f1", "classes")}, indent=1))
    if not args.no_write:
        append_result(entry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
