"""cryocaps side by side with DeepFinder 0.2.1: same data, same budget, same matcher.

Run with the Python that has cryocaps installed (``benchmarks/vs_deepfinder.sh``
does that). One run:

1. makes (or reuses) the DeepFinder venv ``benchmarks/.venv-deepfinder`` with
   ``cryoet-deepfinder==0.2.1`` (TensorFlow 2.13, numpy < 1.24);
2. measures the machine's conv3d ceiling with a small torch probe (start and end);
3. per data set, ``cryocaps simulate`` makes 5 tomograms: 3 for training, 1 for
   validation (both tools get it: cryocaps as ``--val-tomograms``, DeepFinder as
   its ``valid/`` folder and to choose its per-class cluster-size thresholds),
   1 held out for the test;
4. trains each tool for the same wall-clock budget, segments the test tomogram
   (each tool in its own process, timed whole, peak RSS from ``wait4``), turns
   the label map into picks (cryocaps ``cluster-picks`` with the per-class score
   thresholds ``evaluate -o`` tunes on the validation tomogram; DeepFinder
   ``Cluster`` MeanShift + cluster-size thresholds tuned on the same tomogram),
   and scores both with ``cryocaps.evaluation.evaluate_picks``;
5. records whether DeepFinder learned (an object class at voxel F1 >= 0.2 on its
   validation patches with the final weights, and object voxels in the test
   label map); where it did not, the table says "did not learn" beside its F1.
   On sparse sets (simulate's default crowding 0.1) its documented 48³ patches
   stay on the background plateau, so it trains on 32³ patches there; on the
   ``crowded`` set (crowding 0.3) its documented settings learn (RESULTS.md,
   "A DeepFinder that learned");
6. writes ``benchmarks/results/vs_deepfinder.json`` and the section between
   ``<!-- vs_deepfinder:start -->`` and ``<!-- vs_deepfinder:end -->`` of
   ``benchmarks/RESULTS.md`` (the rest of that file is kept).

``--family N`` runs a randomized family of N simulated sets instead of the four
fixed ones (``benchmarks/family.py`` says how draws are made), with
``--annotated-fraction`` for partial annotations; its results go to
``benchmarks/results/family.json`` (runs appended) and the section between
``<!-- family:start -->`` and ``<!-- family:end -->`` of RESULTS.md. A family run
stopped part-way (hours of training on a CPU) goes on with the same command and
``--resume``; ``--record-partial`` records the draws it finished, marked unfinished.

``--quick`` checks the plumbing in minutes (2-minute budgets, small tomograms,
one data set; with ``--family``: one draw of small tomograms, 1.5-minute budgets);
its numbers say nothing about either tool. ``--train-args``,
``--label-shape template`` (cryocaps trains on the particles' envelopes instead of
spheres; the same tomograms) and ``--pick-args`` measure a lever of cryocaps on the
same data, usually with ``--no-deepfinder --no-write``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import family
from _bench import (
    append_run,
    cryocaps_cmd,
    fmt,
    latest_run,
    machine_info,
    replace_section,
    run_measured,
    say,
    train_cmd,
)

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-deepfinder"
DRIVER = HERE / "deepfinder_driver.py"
RESULTS_JSON = HERE / "results" / "vs_deepfinder.json"
RESULTS_MD = HERE / "RESULTS.md"
START_MARK = "<!-- vs_deepfinder:start -->"
END_MARK = "<!-- vs_deepfinder:end -->"

# What pip installs into the DeepFinder venv. 0.2.1 pins tensorflow==2.13.0rc0
# (wheels for CPython 3.8-3.11); numpy 1.24 removed np.int, which it still uses.
DEEPFINDER_REQUIREMENTS = ["cryoet-deepfinder==0.2.1", "numpy<1.24"]
DEEPFINDER_PACKAGES = ["cryoet-deepfinder", "tensorflow", "keras", "numpy", "scikit-learn"]

# ../shared beside the repository, as in DESIGN.md
STRUCTURES = HERE.parent.parent / "shared" / "data" / "structures"


# --------------------------------------------------------------------------- settings


# DeepFinder's training patch: 48 as in its parameter file where that learns; on sparse
# sets (simulate's default crowding 0.1) 48³ patches are 88% background and its training
# collapses onto the background plateau within 20 steps, while 32³ patches (its documented
# knob for smaller memory) leave the plateau after ~200 steps (RESULTS.md).
DOCUMENTED_DF_PATCH = 48
SPARSE_DF_PATCH = 32
# The hard set: 3gl1 (a small complex, ~65 Å), 3j9i (20S proteasome: hollow barrel),
# 1qvr (elongated), 4v4r_30S (ribosomal subunit).
DATASET_NAMES = ("procedural", "crowded", "structures", "hard")
HARD_CLASSES = ("3gl1", "3j9i", "1qvr", "4v4r_30S")


def data_sets(args) -> dict[str, dict]:
    """Name -> ``cryocaps simulate`` options for each data set of this run."""
    shape = "48,96,96" if args.quick else args.shape
    sets = {
        "procedural": {
            "description": f"built-in procedural classes, SNR {args.snr}",
            "options": ["--shape", shape, "--snr", str(args.snr)],
            "df_patch_size": SPARSE_DF_PATCH,
        },
        # The procedural classes packed three times as densely (cryocaps simulate's default
        # crowding is 0.1): where DeepFinder's documented settings learn (RESULTS.md).
        "crowded": {
            "description": f"built-in procedural classes, SNR {args.snr}, crowding {args.crowding}",
            "options": ["--shape", shape, "--snr", str(args.snr), "--crowding", str(args.crowding)],
            "df_patch_size": DOCUMENTED_DF_PATCH,
        },
        "structures": {
            "description": f"{', '.join(args.structure_classes)} from {args.structures}, SNR {args.structures_snr}",
            "options": [
                "--shape",
                shape,
                "--snr",
                str(args.structures_snr),
                "--structures",
                str(args.structures),
                "--classes-from",
                ",".join(args.structure_classes),
            ],
            "df_patch_size": SPARSE_DF_PATCH,
        },
        # Harder, of our own making (issue 18): a small complex among large ones, one of
        # them a hollow ring-stacked barrel (the 20S proteasome), low SNR, crowded.
        "hard": {
            "description": f"{', '.join(HARD_CLASSES)} from {args.structures}, SNR {args.hard_snr}, "
            f"crowding {args.hard_crowding}",
            "options": [
                "--shape",
                shape,
                "--snr",
                str(args.hard_snr),
                "--crowding",
                str(args.hard_crowding),
                "--structures",
                str(args.structures),
                "--classes-from",
                ",".join(HARD_CLASSES),
            ],
            "df_patch_size": DOCUMENTED_DF_PATCH,
        },
    }
    return {name: sets[name] for name in args.datasets}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock training budget per tool and data set, minutes [default: 12; 2 with --quick]",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="plumbing check: 2-minute budgets, 48x96x96 tomograms, procedural data only",
    )
    parser.add_argument(
        "--models",
        default="ucaps,ucaps-fast,unet",
        help="cryocaps models, comma-separated [default: ucaps,ucaps-fast,unet]",
    )
    parser.add_argument(
        "--train-args",
        default="",
        help="extra options for every `cryocaps train`, one quoted string (e.g. "
        "'--lr-schedule cosine'), to measure a training lever on the same data; the tools are "
        "then named with them",
    )
    parser.add_argument(
        "--label-shape",
        choices=("sphere", "template"),
        default="sphere",
        help="label maps cryocaps trains on: spheres of the class radius or the particles' "
        "envelopes (`simulate --label-shape`; the same tomograms either way) [default: sphere]",
    )
    parser.add_argument(
        "--pick-args",
        default="",
        help="extra options for every `cryocaps cluster-picks`, one quoted string (e.g. "
        "'--min-size-fraction 0.05'); the tools are then named with them",
    )
    parser.add_argument(
        "--no-deepfinder",
        action="store_true",
        help="run only the cryocaps models (a lever against an earlier run's DeepFinder)",
    )
    parser.add_argument(
        "--datasets",
        default=None,
        help="procedural,crowded,structures,hard [default: all four; procedural with --quick]",
    )
    parser.add_argument(
        "--shape", default="64,160,160", help="tomogram shape Z,Y,X in voxels [default: 64,160,160]"
    )
    parser.add_argument(
        "--snr", type=float, default=0.4, help="procedural and crowded sets' SNR [default: 0.4]"
    )
    parser.add_argument(
        "--crowding",
        type=float,
        default=0.3,
        help="crowded set: fraction of the slab filled by particles [default: 0.3; simulate's is 0.1]",
    )
    parser.add_argument(
        "--structures",
        type=Path,
        default=STRUCTURES,
        help=f"folder of PDB/maps for the second set [default: {STRUCTURES}]",
    )
    parser.add_argument(
        "--structure-classes",
        default="3gl1,1bxn,1qvr",
        help="structure names for the second set (a small one first) [default: 3gl1,1bxn,1qvr]",
    )
    parser.add_argument(
        "--structures-snr", type=float, default=0.2, help="structures set SNR [default: 0.2]"
    )
    parser.add_argument("--hard-snr", type=float, default=0.15, help="hard set SNR [default: 0.15]")
    parser.add_argument(
        "--hard-crowding", type=float, default=0.25, help="hard set crowding [default: 0.25]"
    )
    parser.add_argument(
        "--df-batch-size", type=int, default=2, help="DeepFinder batch size [default: 2]"
    )
    parser.add_argument(
        "--df-minutes",
        type=float,
        default=None,
        help="DeepFinder's own wall-clock training budget, minutes [default: --minutes], "
        "to see what more time gives it",
    )
    parser.add_argument(
        "--df-max-steps",
        type=int,
        default=0,
        help="also stop DeepFinder's training after this many steps [default: 0, no limit]",
    )
    parser.add_argument(
        "--df-patch-size",
        type=int,
        default=None,
        help=f"DeepFinder training patch, voxels, for every set [default: {DOCUMENTED_DF_PATCH} (its "
        f"parameter file) on the crowded set, {SPARSE_DF_PATCH} on the sparse sets, where "
        f"{DOCUMENTED_DF_PATCH} stays on its background plateau]",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for simulate and both tools [default: 0]"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder (git-ignored) [default: benchmarks/work/vs_deepfinder; "
        "benchmarks/work/family with --family]",
    )
    parser.add_argument(
        "--reuse-data",
        action="store_true",
        help="reuse tomograms simulated earlier with the same options (by default every run "
        "simulates afresh, so a changed simulator cannot leave stale data behind)",
    )
    parser.add_argument(
        "--throughput-minutes",
        type=float,
        default=1.5,
        help="budget of the extra cryocaps runs at DeepFinder's batch and patch size, which measure "
        "training samples/s at equal patch size (first data set only; 0 skips) [default: 1.5]",
    )
    parser.add_argument(
        "--reuse-training",
        action="store_true",
        help="keep the models (and training measurements) of the previous run in --work and redo only "
        "segmentation, picking and scoring; implies --reuse-data",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="do not touch RESULTS.md / results JSON"
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only rewrite the RESULTS.md section from this results JSON (no runs)",
    )
    family.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    family.check_arguments(args, parser)
    if args.work is None:
        args.work = HERE / "work" / ("family" if args.family else "vs_deepfinder")
    if args.minutes is None:
        args.minutes = (1.5 if args.family else 2.0) if args.quick else 12.0
    if args.df_minutes is None:
        args.df_minutes = args.minutes
    if args.reuse_training:
        args.reuse_data = True
    if args.datasets is None:
        args.datasets = "procedural" if args.quick else ",".join(DATASET_NAMES)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.structure_classes = [c.strip() for c in args.structure_classes.split(",") if c.strip()]
    unknown = [d for d in args.datasets if d not in DATASET_NAMES]
    if unknown:
        parser.error(f"--datasets: unknown {unknown}; use {', '.join(DATASET_NAMES)}")
    return args


# --------------------------------------------------------------------------- processes


def driver_cmd(*args) -> list[str]:
    return [str(VENV / "bin" / "python"), str(DRIVER), *[str(a) for a in args]]


# --------------------------------------------------------------------------- DeepFinder venv


def venv_python_ok() -> bool:
    python = VENV / "bin" / "python"
    if not python.exists():
        return False
    probe = "import numpy; import deepfinder.utils.objl, tensorflow; print('ok')"
    done = subprocess.run(
        [str(python), "-c", probe],
        capture_output=True,
        text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return done.returncode == 0 and "ok" in done.stdout


def base_python_for_tensorflow() -> str:
    """A CPython 3.9-3.11 (TensorFlow 2.13 has no wheels for newer ones)."""
    if (3, 9) <= sys.version_info[:2] <= (3, 11):
        return sys.executable
    for name in ("python3.11", "python3.10", "python3.9"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Python 3.9-3.11 found for the DeepFinder venv (TensorFlow 2.13 needs one)")


def ensure_deepfinder_venv(work: Path) -> dict:
    """Create or reuse the DeepFinder venv; return the installed versions."""
    if not venv_python_ok():
        say(f"installing {' '.join(DEEPFINDER_REQUIREMENTS)} into {VENV} (~2.3 GB)")
        if VENV.exists():
            shutil.rmtree(VENV)
        subprocess.run([base_python_for_tensorflow(), "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip"]
        run_measured([*pip, "install", "--upgrade", "pip"], work / "logs" / "venv_pip.log")
        run_measured(
            [*pip, "install", *DEEPFINDER_REQUIREMENTS], work / "logs" / "venv_install.log"
        )
        if not venv_python_ok():
            raise SystemExit(
                f"DeepFinder venv {VENV} does not import deepfinder; see {work / 'logs'}"
            )
    probe = (
        "import importlib.metadata as m, json, platform; "
        f"print(json.dumps({{p: m.version(p) for p in {DEEPFINDER_PACKAGES!r}}} | "
        "{'python': platform.python_version()}))"
    )
    done = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


# --------------------------------------------------------------------------- machine


def conv3d_probe(seconds: float = 3.0) -> dict:
    """GFLOP/s of a 3x3x3, 32->32 channel conv3d on a 48³ float32 block (best of several)."""
    import torch

    x = torch.randn(1, 32, 48, 48, 48)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False)
    flops = 2 * 27 * 32 * 32 * 48**3
    best = float("inf")
    with torch.inference_mode():
        conv(x)  # warm-up: oneDNN picks its kernels
        deadline = time.perf_counter() + seconds
        runs = 0
        while time.perf_counter() < deadline or runs < 3:
            start = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - start)
            runs += 1
    return {
        "gflops_per_second": flops / best / 1e9,
        "best_seconds": best,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------- data


def simulate(name: str, spec: dict, args, folder: Path) -> dict:
    """``cryocaps simulate`` 5 tomograms (with --reuse-data, kept if the same options made them)."""
    options = ["--n-tomograms", "5", "--seed", str(args.seed), *spec["options"]]
    if args.label_shape != "sphere":
        options += ["--label-shape", args.label_shape]
    stamp = folder / "simulate_options.json"
    if (
        folder.exists()
        and args.reuse_data
        and stamp.exists()
        and json.loads(stamp.read_text()) == options
    ):
        say(f"{name}: reusing simulated data in {folder}")
    else:
        if folder.exists():
            shutil.rmtree(folder)
        say(f"{name}: cryocaps simulate {' '.join(options)}")
        run_measured(
            cryocaps_cmd("simulate", folder, *options), folder.parent / "logs" / "simulate.log"
        )
        stamp.write_text(json.dumps(options))
    tomograms = sorted((folder / "tomograms").glob("*.mrc"))
    if len(tomograms) != 5:
        raise SystemExit(f"{folder}/tomograms: expected 5 tomograms, found {len(tomograms)}")
    labels = [folder / "labels" / t.name for t in tomograms]
    missing = [str(p) for p in labels if not p.exists()]
    if missing:
        raise SystemExit(f"simulate wrote no label map {missing[0]}")
    particles = folder / "particles.csv"
    if not particles.exists():
        raise SystemExit(f"simulate wrote no {particles}")
    return {
        "options": options,
        "description": spec["description"],
        "train": tomograms[:3],
        "train_labels": labels[:3],
        "valid": tomograms[3],
        "valid_labels": labels[3],
        "test": tomograms[4],
        "classes_csv": folder / "classes.csv",
        "particles": particles,
    }


# --------------------------------------------------------------------------- scoring


def load_truth(data: dict):
    from cryocaps.io.class_table import read_classes
    from cryocaps.io.particles import read_particles

    classes = read_classes(data["classes_csv"])
    truth = read_particles([data["particles"]], classes=classes)
    return classes, truth


def voxel_size(tomogram: Path) -> float:
    from cryocaps.io.volumes import read_info

    return float(read_info(tomogram).voxel_size_angstrom)


def score(picks, truth, classes, tomogram: Path) -> dict:
    """Particle F1 per class on one tomogram with the shared matcher."""
    from cryocaps.evaluation import evaluate_picks

    name = tomogram.stem
    truth = truth[truth["tomo"].astype(str) == name]
    picks = picks[picks["tomo"].astype(str) == name]
    result = evaluate_picks(picks, truth, classes, voxel_size(tomogram))
    per_class = {c: e["f1"] for c, e in result["classes"].items() if e["f1"] is not None}
    return {
        "f1_per_class": per_class,
        "macro_f1": result["macro"]["f1"],
        "worst_class_f1": min(per_class.values()) if per_class else None,
        "detail": result,
    }


def at_defaults(scored: dict) -> dict:
    """Macro F1 and, per class, precision, recall, F1, false and duplicate picks of a
    ``score`` result: what a user without a validation tomogram gets."""
    keys = ("precision", "recall", "f1", "fp", "duplicates", "n_picks", "n_truth")
    return {
        "macro_f1": scored["macro_f1"],
        "classes": {
            name: {key: entry.get(key) for key in keys}
            for name, entry in scored["detail"]["classes"].items()
        },
    }


def without_thresholds(scored: dict) -> dict:
    """The entries of a tool's result for its picks without validation-tuned thresholds."""
    return {"macro_f1_without_thresholds": scored["macro_f1"], "at_defaults": at_defaults(scored)}


def deepfinder_picks(csv_path: Path, classes):
    """DeepFinder object-list CSV (label numbers) -> cryocaps particle table."""
    import pandas as pd

    table = pd.read_csv(csv_path)
    table["class_name"] = [classes.name_of(int(label)) for label in table["label"]]
    table["score"] = table["cluster_size"].astype(float)
    return table[["tomo", "class_name", "x", "y", "z", "score", "cluster_size"]]


def choose_thresholds(valid_picks, truth, classes, tomogram: Path) -> dict[int, int]:
    """Per class, the minimum cluster size that maximises validation F1 (ties: the smaller)."""
    from cryocaps.evaluation import evaluate_picks

    name = tomogram.stem
    truth = truth[truth["tomo"].astype(str) == name]
    thresholds = {}
    for particle_class in classes:
        own = valid_picks[valid_picks["class_name"] == particle_class.name]
        best_threshold, best_f1 = 1, -1.0
        # "Keep sizes >= s + 1" for each size s seen: every distinct outcome, each at
        # its smallest threshold, so ties keep the most clusters.
        for threshold in sorted({1, *(int(s) + 1 for s in own["cluster_size"])}):
            kept = own[own["cluster_size"] >= threshold]
            result = evaluate_picks(kept, truth, classes, voxel_size(tomogram))
            f1 = result["classes"][particle_class.name]["f1"] or 0.0
            if f1 > best_f1:
                best_threshold, best_f1 = threshold, f1
        thresholds[particle_class.label] = best_threshold
    return thresholds


# --------------------------------------------------------------------------- tools


def read_training_log(run_dir: Path) -> dict:
    """Steps and seconds per step of a ``cryocaps train`` run, from its run.json / metrics.csv."""
    summary = {}
    run_json = run_dir / "run.json"
    if run_json.exists():
        info = json.loads(run_json.read_text())
        results = info.get("results", {}) or {}
        names = {
            "steps_done": "steps",
            "epochs_done": "epochs_done",
            "stopped": "stopped",
            "seconds_per_step": "seconds_per_step",
            "samples_per_second": "samples_per_second",
            "best_epoch": "best_epoch",
            "best_val_loss": "best_val_loss",
            "best_mean_dice": "best_mean_val_dice",
        }
        for key, name in names.items():
            if key in results:
                summary[name] = results[key]
        parameters = info.get("parameters", {}) or {}
        for key in ("batch_size", "patch_size", "steps_per_epoch"):
            if key in parameters:
                summary[key] = parameters[key]
    metrics = run_dir / "metrics.csv"
    if metrics.exists() and "steps" not in summary:
        import pandas as pd

        frame = pd.read_csv(metrics)
        if "step" in frame:
            summary["steps"] = int(frame["step"].max())
    return summary


def previous_training(args, dataset: str, key: str, folder: Path, weights: Path) -> dict | None:
    """With --reuse-training: the earlier run's training entry for this tool, if its model is there."""
    if not args.reuse_training or not weights.exists():
        return None
    entry = args.previous_report.get("datasets", {}).get(dataset, {}).get("tools", {}).get(key, {})
    train = entry.get("train")
    if not train or "error" in entry:
        return None
    say(f"{key}: reusing the model trained in the earlier run ({folder})")
    return train | {"reused_from_earlier_run": True}


def fresh_folder(folder: Path, keep: list[str]) -> None:
    """Empty ``folder`` except the entries named in ``keep``."""
    if not folder.exists():
        return
    for child in folder.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def tool_name(model: str, args) -> str:
    """``cryocaps <model>`` and whatever the run changed from the defaults."""
    words = ["cryocaps", model, args.train_args]
    if args.label_shape != "sphere":
        words.append(f"(labels: {args.label_shape})")
    if args.pick_args:
        words.append(f"(cluster-picks {args.pick_args})")
    return " ".join(w for w in words if w)


def run_cryocaps(model: str, data: dict, args, folder: Path, classes, truth, dataset: str) -> dict:
    run_dir, seg_dir = folder / "model", folder / "segment"
    pick_options = shlex.split(args.pick_args)  # every cluster-picks call gets them
    logs = folder / "logs"
    train = previous_training(args, dataset, f"cryocaps-{model}", folder, run_dir / "model.pt")
    fresh_folder(folder, keep=["model"] if train else [])
    if train is None:
        say(f"cryocaps {model}: train {args.minutes:g} min")
        train = run_measured(
            train_cmd(
                [*data["train"], data["valid"]],
                [*data["train_labels"], data["valid_labels"]],
                data["classes_csv"],
                run_dir,
                model,
                args.minutes,
                args.seed,
                *shlex.split(args.train_args),
                val_tomogram=data["valid"].stem,
            ),
            logs / "train.log",
        )
        train |= read_training_log(run_dir)
    if (
        train.get("seconds_per_step")
        and "samples_per_second" not in train
        and train.get("batch_size")
    ):
        train["samples_per_second"] = train["batch_size"] / train["seconds_per_step"]

    from cryocaps.io.particles import read_particles

    segments, picks_paths = {}, {}
    for role in ("valid", "test"):
        tomogram = data[role]
        say(f"cryocaps {model}: segment {role} tomogram {tomogram.name}")
        segments[role] = run_measured(
            cryocaps_cmd("segment", tomogram, "--model", run_dir, "-o", seg_dir / role),
            logs / f"segment_{role}.log",
        )
    # Like DeepFinder's cluster-size thresholds: per-class score thresholds tuned on the
    # validation tomogram (`evaluate -o` writes them), applied to the test tomogram.
    label_maps = {
        role: seg_dir / role / f"{data[role].stem}_labels.mrc" for role in ("valid", "test")
    }
    say(f"cryocaps {model}: cluster-picks, thresholds from the validation tomogram")
    picks_paths["valid"] = folder / "picks_valid.csv"
    run_measured(
        cryocaps_cmd(
            "cluster-picks",
            label_maps["valid"],
            "-o",
            picks_paths["valid"],
            "--classes",
            data["classes_csv"],
            *pick_options,
        ),
        logs / "cluster_picks_valid.log",
    )
    valid_report = folder / "valid_report"
    run_measured(
        cryocaps_cmd(
            "evaluate",
            picks_paths["valid"],
            data["particles"],
            "--classes",
            data["classes_csv"],
            "--tomograms",
            data["valid"],
            "-o",
            valid_report,
        ),
        logs / "evaluate_valid.log",
    )
    thresholds_csv = valid_report / "pick_thresholds.csv"
    picks_paths["raw"] = folder / "picks_without_thresholds.csv"
    run_measured(
        cryocaps_cmd(
            "cluster-picks",
            label_maps["test"],
            "-o",
            picks_paths["raw"],
            "--classes",
            data["classes_csv"],
            *pick_options,
        ),
        logs / "cluster_picks_raw.log",
    )
    picks_paths["test"] = folder / "picks.csv"
    pick = run_measured(
        cryocaps_cmd(
            "cluster-picks",
            label_maps["test"],
            "-o",
            picks_paths["test"],
            "--classes",
            data["classes_csv"],
            "--thresholds",
            thresholds_csv,
            *pick_options,
        ),
        logs / "cluster_picks.log",
    )
    import pandas as pd

    thresholds = pd.read_csv(thresholds_csv)
    picks = read_particles([picks_paths["test"]], classes=classes)
    raw = read_particles([picks_paths["raw"]], classes=classes)
    return {
        "tool": tool_name(model, args),
        "train": train,
        "segment": segments["test"],
        "segment_valid": segments["valid"],
        "pick": pick,
        "thresholds": {
            name: (None if value != value else round(float(value), 4))
            for name, value in zip(thresholds["class_name"], thresholds["min_score"], strict=True)
        },
        **without_thresholds(score(raw, truth, classes, data["test"])),
        "n_picks": len(picks),
        **score(picks, truth, classes, data["test"]),
    }


def train_deepfinder(
    data: dict, args, folder: Path, n_classes: int, radii: dict, particles_csv: Path
):
    """TargetBuilder targets and object lists, then Train under the budget; (prepare, train) measurements."""
    logs = folder / "logs"
    dataset = folder / "dataset"
    say("DeepFinder: targets (TargetBuilder spheres) and object lists")
    prepare = run_measured(
        driver_cmd(
            "prepare",
            "--particles",
            particles_csv,
            "--radii-voxels",
            ",".join(f"{label}={r:.3f}" for label, r in radii.items()),
            "--train",
            *data["train"],
            "--valid",
            data["valid"],
            "--dataset",
            dataset,
        ),
        logs / "prepare.log",
    )

    say(f"DeepFinder: train {args.df_minutes:g} min")
    train = run_measured(
        driver_cmd(
            "train",
            "--dataset",
            dataset,
            "--n-classes",
            n_classes,
            "--out",
            folder / "model",
            "--minutes",
            args.df_minutes,
            "--max-steps",
            args.df_max_steps,
            "--batch-size",
            args.df_batch_size,
            "--patch-size",
            data["df_patch_size"],
            "--seed",
            args.seed,
        ),
        logs / "train.log",
    )
    train |= json.loads((folder / "model" / "train.json").read_text())
    return prepare, train


def deepfinder_learned(train: dict, segment: dict) -> dict:
    """Did DeepFinder learn: its own validation verdict and an object voxel in the test map.

    ``train["learned"]`` comes from the driver (an object class at voxel F1 >= 0.2
    on DeepFinder's validation patches with the final weights); a model trained
    before the driver kept that verdict is judged by its test label map alone.
    """
    test_objects = int(sum(segment["label_voxels"][1:]))
    final = train.get("final_validation") or {}
    verdict = test_objects > 0 and train.get("learned", True)
    return {
        "verdict": bool(verdict),
        "test_object_voxels": test_objects,
        "validation_voxel_f1": final.get("valid_f1"),
        "first_loss": train.get("first_loss"),
        "last_loss": train.get("last_loss"),
        "steps": train.get("steps"),
    }


def run_deepfinder(data: dict, args, folder: Path, classes, truth, dataset: str) -> dict:
    import pandas as pd

    weights = folder / "model" / "net_weights_FINAL.h5"
    train = previous_training(args, dataset, "deepfinder", folder, weights)
    fresh_folder(folder, keep=["model", "dataset"] if train else [])
    logs = folder / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    voxel = voxel_size(data["test"])
    n_classes = classes.n_labels
    if [c.label for c in classes] != list(range(1, n_classes)):
        raise SystemExit(f"{data['classes_csv']}: DeepFinder needs labels 1..K without gaps")
    radii = {c.label: c.radius_angstrom / voxel for c in classes}
    # DeepFinder's Cluster takes one radius for all classes: their mean, whole voxels.
    cluster_radius = max(1, round(sum(radii.values()) / len(radii)))

    particles = truth.copy()
    particles["label"] = [classes.by_name(name).label for name in particles["class_name"]]
    particles_csv = folder / "particles_labels.csv"
    particles[["tomo", "label", "x", "y", "z"]].to_csv(particles_csv, index=False)
    if train is None:
        prepare, train = train_deepfinder(data, args, folder, n_classes, radii, particles_csv)
    else:
        prepare = {"reused_from_earlier_run": True}

    objls = {}
    segments = {}
    clusters = {}
    for role in ("valid", "test"):
        tomogram = data[role]
        say(f"DeepFinder: segment {role} tomogram {tomogram.name}")
        label_map = folder / "segment" / f"{tomogram.stem}_labelmap.mrc"
        segments[role] = run_measured(
            driver_cmd(
                "segment",
                "--tomogram",
                tomogram,
                "--weights",
                weights,
                "--n-classes",
                n_classes,
                "--out",
                label_map,
            ),
            logs / f"segment_{role}.log",
        )
        segments[role] |= json.loads(label_map.with_suffix(".json").read_text())
        say(f"DeepFinder: cluster {role} tomogram (MeanShift, radius {cluster_radius} voxels)")
        objl = folder / "picks" / f"{tomogram.stem}_objl_raw.xml"
        clusters[role] = run_measured(
            driver_cmd(
                "cluster",
                "--labelmap",
                label_map,
                "--radius-voxels",
                cluster_radius,
                "--tomo",
                tomogram.stem,
                "--out",
                objl,
            ),
            logs / f"cluster_{role}.log",
        )
        clusters[role] |= json.loads(objl.with_suffix(".json").read_text())
        objls[role] = objl

    valid_picks = deepfinder_picks(objls["valid"].with_suffix(".csv"), classes)
    thresholds = choose_thresholds(valid_picks, truth, classes, data["valid"])
    say(f"DeepFinder: cluster-size thresholds from validation {thresholds}")
    filtered = folder / "picks" / f"{data['test'].stem}_objl_thr.xml"
    run_measured(
        driver_cmd(
            "filter",
            "--objl",
            objls["test"],
            "--tomo",
            data["test"].stem,
            "--out",
            filtered,
            "--thresholds",
            ",".join(f"{label}={t}" for label, t in thresholds.items()),
        ),
        logs / "filter.log",
    )
    picks = deepfinder_picks(filtered.with_suffix(".csv"), classes)
    raw_test = score(
        deepfinder_picks(objls["test"].with_suffix(".csv"), classes), truth, classes, data["test"]
    )
    return {
        "tool": "DeepFinder 0.2.1",
        "learned": deepfinder_learned(train, segments["test"]),
        "prepare": prepare,
        "train": train,
        "segment": segments["test"],
        "segment_valid": segments["valid"],
        "pick": clusters["test"],
        "pick_valid": clusters["valid"],
        "cluster_radius_voxels": cluster_radius,
        "thresholds": {classes.by_label(label).name: t for label, t in thresholds.items()},
        **without_thresholds(raw_test),
        "n_picks": len(picks),
        **score(pd.DataFrame(picks), truth, classes, data["test"]),
    }


def throughput_at_patch(model: str, data: dict, args, folder: Path) -> dict:
    """Training samples/s of ``cryocaps train`` at DeepFinder's batch and patch size.

    A short run (``--max-minutes``) on the same tomograms, validation kept small;
    ``seconds_per_step`` from its run.json counts sampling, forward, backward and
    the optimiser step, as DeepFinder's step time counts its batch generation.
    """
    run_dir = folder / f"throughput-{model}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    measured = run_measured(
        train_cmd(
            data["train"],
            data["train_labels"],
            data["classes_csv"],
            run_dir,
            model,
            args.throughput_minutes,
            args.seed,
            "--patch-size",
            data["df_patch_size"],
            "--batch-size",
            args.df_batch_size,
            "--steps-per-epoch",
            20,
            "--max-val-patches",
            4,
        ),
        folder / "logs" / f"throughput_{model}.log",
    )
    log = read_training_log(run_dir)
    return {
        "model": model,
        "patch_size": data["df_patch_size"],
        "batch_size": args.df_batch_size,
        "steps": log.get("steps"),
        "seconds_per_step": log.get("seconds_per_step"),
        "samples_per_second": log.get("samples_per_second"),
        "wall_seconds": measured["wall_seconds"],
    }


def add_rates(entry: dict, voxels: int) -> None:
    seg = entry["segment"]
    seg["voxels"] = voxels
    seg["voxels_per_second"] = voxels / seg["wall_seconds"]


# --------------------------------------------------------------------------- report


def gib(n_bytes) -> str:
    return "–" if n_bytes is None else f"{n_bytes / 2**30:.2f} GiB"


# Rows of the side-by-side table: (label, how to read the cell from a tool's entry).
TABLE_ROWS = [
    ("macro F1", lambda e: fmt(e["macro_f1"])),
    ("worst-class F1", lambda e: fmt(e["worst_class_f1"])),
    ("picks on test", lambda e: str(e["n_picks"])),
    ("training steps", lambda e: str(e["train"].get("steps", "–"))),
    (
        "batch × patch",
        lambda e: f"{e['train'].get('batch_size', '?')} × {e['train'].get('patch_size', '?')}³",
    ),
    ("s / step", lambda e: fmt(e["train"].get("seconds_per_step"))),
    ("samples / s", lambda e: fmt(e["train"].get("samples_per_second"))),
    ("train process wall", lambda e: fmt(e["train"]["wall_seconds"], ".0f", " s")),
    ("train peak RSS", lambda e: gib(e["train"]["peak_rss_bytes"])),
    ("segment wall (whole process)", lambda e: fmt(e["segment"]["wall_seconds"], ".1f", " s")),
    ("segment CPU time (user+sys)", lambda e: fmt(e["segment"]["cpu_seconds"], ".1f", " s")),
    ("segment voxels / s", lambda e: fmt(e["segment"]["voxels_per_second"] / 1e3, ".1f", " k")),
    ("segment peak RSS", lambda e: gib(e["segment"]["peak_rss_bytes"])),
    ("picking wall (whole process)", lambda e: fmt(e["pick"]["wall_seconds"], ".1f", " s")),
    ("picking peak RSS", lambda e: gib(e["pick"]["peak_rss_bytes"])),
]


def learned_verdict(entry: dict) -> dict | None:
    """Whether a DeepFinder entry learned; also for results written before the verdict was kept.

    Earlier results JSON has no ``learned`` entry; there a test label map with
    no object voxel (``segment.label_voxels``) is the evidence that it did not.
    """
    if "learned" in entry:
        return entry["learned"]
    counts = (entry.get("segment") or {}).get("label_voxels")
    if not counts:
        return None
    objects = int(sum(counts[1:]))
    return {"verdict": objects > 0, "test_object_voxels": objects, "validation_voxel_f1": None}


def learned_note(entry: dict) -> str:
    """``; validation voxel F1 per class …`` for the DeepFinder notes line, when known."""
    verdict = learned_verdict(entry) or {}
    f1 = verdict.get("validation_voxel_f1")
    if not f1:
        return ""
    return (
        f"; validation voxel F1 per class (background first, final weights) "
        f"{', '.join(f'{v:.2f}' for v in f1)}"
    )


def learned_cell(entry: dict) -> str:
    verdict = learned_verdict(entry)
    if verdict is None:
        return "–"
    if verdict["verdict"]:
        return "yes"
    return "**no**: background-only" if verdict["test_object_voxels"] == 0 else "**no**"


# Rows whose numbers mean nothing for a tool that did not learn: they say so beside the number.
ACCURACY_ROWS = ("macro F1", "worst-class F1")


def comparison_rows(tools: dict, class_names: list[str]) -> list[str]:
    """Markdown rows, one column per tool; per-class F1 rows after the worst-class row."""
    per_class = [(f"F1 {c}", lambda e, c=c: fmt(e["f1_per_class"].get(c))) for c in class_names]
    rows = TABLE_ROWS[:2] + per_class + TABLE_ROWS[2:]
    if any(learned_verdict(e) is not None for e in tools.values()):
        rows = [("learned?", learned_cell), *rows]
    accuracy = {*ACCURACY_ROWS, *(label for label, _ in per_class)}
    lines = []
    for label, cell in rows:
        cells = []
        for entry in tools.values():
            try:
                text = cell(entry)
            except (KeyError, TypeError):
                text = "–"
            verdict = learned_verdict(entry)
            if label in accuracy and verdict is not None and not verdict["verdict"]:
                text += " (did not learn)"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def defaults_rows(tools: dict, class_names: list[str]) -> list[str]:
    """Picks without validation-tuned thresholds (cryocaps' CLI defaults; DeepFinder's
    Cluster without cluster-size thresholds): per class precision, duplicates and F1."""
    with_defaults = {key: e for key, e in tools.items() if e.get("at_defaults")}
    if not with_defaults:
        return []

    def cell(entry: dict, name: str) -> str:
        found = entry["at_defaults"]["classes"].get(name) or {}
        if not found.get("n_picks"):
            return "no picks"
        duplicates = found.get("duplicates") or 0
        return (
            f"P {fmt(found.get('precision'))}, dup {duplicates}/{found['n_picks']}, "
            f"F1 {fmt(found.get('f1'))}"
        )

    lines = [
        "Without a validation tomogram (cryocaps `cluster-picks` at its defaults; DeepFinder's "
        "Cluster without size thresholds): precision, duplicate picks / picks, F1 per class.",
        "",
        "| | " + " | ".join(e["tool"] for e in with_defaults.values()) + " |",
        "|---" * (len(with_defaults) + 1) + "|",
        "| macro F1 | "
        + " | ".join(fmt(e["at_defaults"]["macro_f1"]) for e in with_defaults.values())
        + " |",
    ]
    for name in class_names:
        lines.append(
            f"| {name} | " + " | ".join(cell(e, name) for e in with_defaults.values()) + " |"
        )
    return [*lines, ""]


def deepfinder_budget_note(settings: dict) -> str:
    """`` (DeepFinder: 40 min)`` when DeepFinder had its own budget."""
    df_minutes = settings.get("df_minutes")
    notes = []
    if df_minutes is not None and df_minutes != settings["minutes"]:
        notes.append(f"{df_minutes:g} min")
    if settings.get("df_max_steps"):
        notes.append(f"at most {settings['df_max_steps']} steps")
    return f" (DeepFinder: {', '.join(notes)})" if notes else ""


def markdown_section(report: dict) -> str:
    machine = report["machine"]
    probe = report["conv3d_probe"]
    lines = [
        START_MARK,
        "## cryocaps vs DeepFinder 0.2.1 (`benchmarks/vs_deepfinder.py`)",
        "",
        f"Run {report['finished']} UTC{' — QUICK MODE: plumbing check only, numbers mean nothing' if report['settings']['quick'] else ''}.",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cpu_count_available', machine['cpu_count'])} "
        f"CPU cores, {machine.get('memory_gib', '?')} GiB, {machine['platform']}; torch {machine['torch']} "
        f"({machine['torch_threads']} threads), DeepFinder {report['deepfinder_versions'].get('cryoet-deepfinder')} "
        f"with TensorFlow {report['deepfinder_versions'].get('tensorflow')}. Load average at start "
        f"{', '.join(f'{v:.1f}' for v in machine['load_average_at_start'])}, at end "
        f"{', '.join(f'{v:.1f}' for v in machine.get('load_average_at_end', [float('nan')] * 3))} "
        "(1, 5, 15 min).",
        f"conv3d ceiling (torch, 3³ 32→32 ch on 48³, best run): "
        f"{probe['start']['gflops_per_second']:.0f} GFLOP/s at start, {probe['end']['gflops_per_second']:.0f} GFLOP/s at end.",
        "",
        f"Same data and budget for every tool: `cryocaps simulate` 5 tomograms (3 train, 1 validation "
        f"given to both, 1 test), {report['settings']['minutes']:g} min wall-clock training each"
        + deepfinder_budget_note(report["settings"])
        + ", "
        "the test tomogram scored by `cryocaps.evaluation.evaluate_picks` (tolerance 0.5 × class radius). "
        "cryocaps: CLI defaults (`train --max-minutes`, `segment`, `cluster-picks`), picks filtered with "
        "the per-class score thresholds `evaluate -o` tuned on the validation tomogram "
        "(`cluster-picks --thresholds`). DeepFinder: "
        f"TargetBuilder spheres, Train (batch {report['settings']['df_batch_size']}, patch as in the "
        f"'batch × patch' row: {DOCUMENTED_DF_PATCH} as in its parameter file where that learns, "
        f"{SPARSE_DF_PATCH} on sparse sets, where {DOCUMENTED_DF_PATCH} stays on its background "
        "plateau; bootstrap, Lrnd 13), Segment, Cluster (MeanShift), per-class "
        "cluster-size thresholds chosen on the validation tomogram. Segmentation and picking are timed as whole "
        "processes (imports and file I/O included); peak RSS is that process's own.",
        "",
    ]
    for name, dataset in report["datasets"].items():
        tools = dataset["tools"]
        names = list(tools)
        lines += [
            f"### {name}: {dataset['description']}",
            "",
            f"Test tomogram {dataset['test_shape_zyx']} voxels; options `{' '.join(dataset['simulate_options'])}`.",
            "",
        ]
        lines.append("| | " + " | ".join(tools[t]["tool"] for t in names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        lines += comparison_rows(tools, [c["name"] for c in dataset["classes"]])
        for entry in tools.values():
            if "error" in entry:
                lines.append(f"\n{entry['tool']} FAILED: `{entry['error'].splitlines()[0]}`")
        lines.append("")
        lines += defaults_rows(tools, [c["name"] for c in dataset["classes"]])
        for key, entry in tools.items():
            if key.startswith("cryocaps") and "thresholds" in entry:
                lines.append(
                    f"{entry['tool']} score thresholds from validation: {entry['thresholds']}; macro F1 "
                    f"without them {fmt(entry.get('macro_f1_without_thresholds'))}."
                    + (
                        " Model reused from the previous run (training numbers are that run's)."
                        if entry["train"].get("reused_from_earlier_run")
                        else ""
                    )
                )
        df = tools.get("deepfinder")
        if df:
            lines.append(
                f"DeepFinder thresholds (min cluster size, voxels): {df['thresholds']}; macro F1 "
                f"without them {fmt(df['macro_f1_without_thresholds'])}; cluster radius "
                f"{df['cluster_radius_voxels']} voxels; Segment patch {df['segment'].get('patch_size')}; "
                f"training loss {df['train'].get('first_loss')} at the first step, "
                f"{df['train'].get('last_loss')} at the last"
                + learned_note(df)
                + "."
                + (
                    " Model reused from the previous run (training numbers are that run's)."
                    if df["train"].get("reused_from_earlier_run")
                    else ""
                )
            )
            notes = df["pick"].get("notes") or []
            lines += [f"Note: {n}" for n in notes]
            lines.append("")
    lines += throughput_lines(report.get("throughput_equal_patch"))
    lines += ["Raw numbers: `benchmarks/results/vs_deepfinder.json`.", END_MARK]
    return "\n".join(lines) + "\n"


def throughput_lines(throughput: dict | None) -> list[str]:
    """Training samples/s at DeepFinder's patch and batch size, one row per tool."""
    if not throughput:
        return []
    df = throughput.get("deepfinder") or {}
    lines = [
        f"### Training throughput at equal patch size ({throughput['dataset']} data)",
        "",
        "| tool | batch × patch | s / step | samples / s |",
        "|---|---|---|---|",
        f"| DeepFinder 0.2.1 (its budgeted run) | {df.get('batch_size', '?')} × {df.get('patch_size', '?')}³ | "
        f"{fmt(df.get('seconds_per_step'), '.3f')} | {fmt(df.get('samples_per_second'), '.2f')} |",
    ]
    for model, entry in throughput.items():
        if model in ("dataset", "deepfinder"):
            continue
        if "error" in entry:
            lines.append(f"| cryocaps {model} | FAILED: {entry['error'].splitlines()[0]} | | |")
            continue
        lines.append(
            f"| cryocaps {model} ({entry['steps']} steps) | {entry['batch_size']} × {entry['patch_size']}³ | "
            f"{fmt(entry['seconds_per_step'], '.3f')} | {fmt(entry['samples_per_second'], '.2f')} |"
        )
    return lines + [""]


def write_results(report: dict) -> None:
    append_run(RESULTS_JSON, report)  # the earlier runs stay: older tables quote them
    replace_section(RESULTS_MD, markdown_section(report), START_MARK, END_MARK)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    from cryocaps.errors import CryocapsError

    args = parse_args(argv)
    if args.family or (args.render and args.render.name.startswith("family")):
        return family.run_family(args)
    if args.render:
        replace_section(RESULTS_MD, markdown_section(latest_run(args.render)), START_MARK, END_MARK)
        say(f"rewrote the vs_deepfinder section of {RESULTS_MD} from {args.render}")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    # read before this run overwrites it: the earlier run's measurements, for --reuse-training
    previous = args.work / "partial_results.json"
    args.previous_report = json.loads(previous.read_text()) if previous.exists() else {}
    started = time.time()
    report = {
        "command": shlex.join(
            ["benchmarks/vs_deepfinder.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("previous_report", "argv")
        },
    }
    report["deepfinder_versions"] = {}
    if not args.no_deepfinder:
        report["deepfinder_versions"] = ensure_deepfinder_venv(args.work)
        say(f"DeepFinder venv ready: {report['deepfinder_versions']}")
    report["machine"] = machine_info()
    report["conv3d_probe"] = {"start": conv3d_probe()}
    say(f"conv3d probe: {report['conv3d_probe']['start']['gflops_per_second']:.0f} GFLOP/s")

    report["datasets"] = {}
    for name, spec in data_sets(args).items():
        folder = args.work / name
        data = simulate(name, spec, args, folder / "data")
        data["df_patch_size"] = args.df_patch_size or spec["df_patch_size"]
        classes, truth = load_truth(data)
        from cryocaps.io.volumes import read_info

        info = read_info(data["test"])
        voxels = int(info.shape[0] * info.shape[1] * info.shape[2])
        tools = {}
        report["datasets"][name] = {
            "description": spec["description"],
            "simulate_options": data["options"],
            "test_tomogram": data["test"].name,
            "test_shape_zyx": list(info.shape),
            "classes": classes.to_records(),
            "tools": tools,
        }
        runs = (
            [] if args.no_deepfinder else [("deepfinder", "DeepFinder 0.2.1", run_deepfinder, ())]
        )
        runs += [(f"cryocaps-{m}", f"cryocaps {m}", run_cryocaps, (m,)) for m in args.models]
        for key, label, run, extra in runs:
            try:
                tools[key] = run(*extra, data, args, folder / key, classes, truth, name)
                add_rates(tools[key], voxels)
                say(
                    f"{name} {key}: macro F1 {fmt(tools[key]['macro_f1'])}, "
                    f"worst {fmt(tools[key]['worst_class_f1'])}, "
                    f"segment {tools[key]['segment']['wall_seconds']:.1f} s"
                )
            except (RuntimeError, OSError, ValueError, KeyError, CryocapsError) as error:
                # One tool failing must not throw away an hour of the others' numbers.
                tools[key] = {"tool": label, "error": str(error)}
                say(f"{name} {key}: FAILED: {error}")
            partial = args.work / "partial_results.json"
            partial.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if args.throughput_minutes > 0 and "throughput_equal_patch" not in report:
            report["throughput_equal_patch"] = {
                "dataset": name,
                "deepfinder": tools.get("deepfinder", {}).get("train"),
            }
            for model in args.models:
                say(
                    f"cryocaps {model}: training throughput at patch {data['df_patch_size']}, batch {args.df_batch_size}"
                )
                try:
                    report["throughput_equal_patch"][model] = throughput_at_patch(
                        model, data, args, folder
                    )
                except (RuntimeError, OSError) as error:
                    report["throughput_equal_patch"][model] = {"error": str(error)}

    report["conv3d_probe"]["end"] = conv3d_probe()
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["finished"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    report["total_seconds"] = time.time() - started
    # the finished report, also for --no-write runs: `--render` takes it as it is
    (args.work / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not args.no_write:
        write_results(report)
        say(f"wrote {RESULTS_JSON} and the vs_deepfinder section of {RESULTS_MD}")
    else:
        print(markdown_section(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
