"""Drive DeepFinder 0.2.1 through its own library, one step per subcommand.

This script runs INSIDE the DeepFinder venv (``benchmarks/.venv-deepfinder``,
made by ``vs_deepfinder.py``), never in the cryocaps venv: it imports only
numpy, mrcfile and ``deepfinder``. It holds no DeepFinder code; each step
calls the public classes its documentation and examples use:

``prepare``  particle CSV -> DeepFinder data set folder (``train/`` + ``valid/``
             with ``<tomo>.mrc``, ``<tomo>_target.mrc`` from
             ``TargetBuilder.generate_with_spheres``, ``<tomo>_objl.xml``)
``train``    ``Dataloader`` + ``Train.launch`` with the parameters of its
             documented parameter file, stopped after a wall-clock budget
``segment``  ``Segment.launch`` + ``smap.to_labelmap`` -> label map MRC
``cluster``  ``Cluster.launch`` (MeanShift) -> object list XML + CSV with cluster sizes
``filter``   ``objl.above_thr_per_class`` with per-class cluster-size thresholds

Every subcommand that measures something writes a small JSON beside its output.
Coordinates in the CSV files are 0-based voxels, x/y/z, like cryocaps tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path

# Keep TensorFlow's start-up chatter out of the benchmark logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def restore_numpy_aliases() -> None:
    """DeepFinder 0.2.1 still uses ``np.int``/``np.float``/``np.bool`` (removed in numpy 1.24)."""
    import numpy as np

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=SyntaxWarning)
    for alias, builtin in (("int", int), ("float", float), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    import tensorflow as tf

    tf.random.set_seed(seed)


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def parse_mapping(text: str, value_type=float) -> dict[int, float]:
    """``"1=5,2=3.5"`` -> ``{1: 5.0, 2: 3.5}``."""
    mapping = {}
    for item in text.split(","):
        label, value = item.split("=")
        mapping[int(label)] = value_type(value)
    return mapping


def read_particle_rows(path: Path) -> list[dict]:
    """Rows of a CSV with at least ``tomo, label, x, y, z``."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def mrc_shape(path: Path) -> tuple[int, int, int]:
    import mrcfile

    with mrcfile.mmap(path, permissive=True) as mrc:
        return tuple(int(n) for n in mrc.data.shape)


# --------------------------------------------------------------------------- prepare


def prepare(args) -> None:
    """Write the data set folder that ``deepfinder.utils.dataloader.Dataloader`` reads."""
    import numpy as np
    from deepfinder.training import TargetBuilder
    from deepfinder.utils import common as cm
    from deepfinder.utils import objl as ol

    radii = parse_mapping(args.radii_voxels)
    labels = sorted(radii)
    if labels != list(range(1, len(labels) + 1)):
        sys.exit(f"--radii-voxels: labels must be 1..K without gaps, got {labels}")
    # TargetBuilder builds its sphere stencils on an integer grid: whole-voxel radii.
    radius_list = [max(1, int(round(radii[label]))) for label in labels]
    rows = read_particle_rows(Path(args.particles))

    summary = {"radius_list_voxels": radius_list, "tomograms": {}}
    for split, tomograms in (("train", args.train), ("valid", args.valid)):
        folder = Path(args.dataset) / split
        folder.mkdir(parents=True, exist_ok=True)
        for tomogram in tomograms:
            tomogram = Path(tomogram).resolve()
            name = tomogram.stem
            objl = []
            for row in rows:
                if row["tomo"] != name:
                    continue
                # 0-based voxel centres are integers; TargetBuilder truncates with int(), so round first.
                coord = tuple(float(round(float(row[axis]))) for axis in ("z", "y", "x"))
                ol.add_obj(objl, label=int(row["label"]), coord=coord)
            if not objl:
                sys.exit(f"--particles: no particle for tomogram {name!r}")
            target = TargetBuilder()
            target.obs_list = []  # silence its per-object progress lines
            target_array = target.generate_with_spheres(
                objl, np.zeros(mrc_shape(tomogram), dtype=np.int8), radius_list
            )
            link = folder / f"{name}.mrc"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(tomogram)
            cm.write_array(target_array, str(folder / f"{name}_target.mrc"))
            ol.write_xml(objl, str(folder / f"{name}_objl.xml"))
            summary["tomograms"][name] = {"split": split, "particles": len(objl)}
    write_json(Path(args.dataset) / "prepare.json", summary)


# --------------------------------------------------------------------------- train


class TrainingBudgetReached(Exception):
    """Raised from the progress observer once the wall-clock budget is spent."""


class BudgetObserver:
    """A DeepFinder observer (``set_observer``) that times steps and stops at a deadline.

    ``Train.launch`` reports every training step through its observers right
    after ``train_on_batch`` returns; raising here ends the loop between steps,
    so the weights saved afterwards are those of the last finished step.
    """

    def __init__(self, budget_seconds: float, log, max_steps: int = 0, probe=None):
        self.started = time.perf_counter()
        self.deadline = self.started + budget_seconds
        self.max_steps = max_steps  # 0: no step budget
        self.probe = probe  # a ProbeTrace, or None
        self.log = log
        self.step_seconds: list[float] = []
        self.losses: list[float] = []
        self.epochs_finished = 0
        self._last = self.started

    def display(self, message: str) -> None:
        now = time.perf_counter()
        print(message, file=self.log, flush=True)
        if message.startswith("epoch ") and " - it " in message:
            self.step_seconds.append(now - self._last)
            self.losses.append(float(message.split("loss:")[1].split()[0]))
            if self.probe is not None:
                self.probe.after_step(len(self.losses))
                now = time.perf_counter()  # probing is not training time
            self._last = now
            if now >= self.deadline or 0 < self.max_steps <= len(self.losses):
                raise TrainingBudgetReached
        elif message.startswith("EPOCH "):
            self.epochs_finished += 1
        if message.startswith("=" * 10):
            self._last = now  # validation and history plots are not training steps


class ProbeTrace:
    """Soft per-class scores of the network on fixed validation patches, every ``every`` steps.

    On DeepFinder's background plateau the argmax maps are empty and the loss
    is flat to three decimals; what still moves underneath is the probability
    each object class gets on its own voxels against elsewhere. The patches are
    drawn once, with numpy's random state saved and restored around the draw,
    so the training batches are the same as without probing.
    """

    def __init__(self, trainer, path_data, path_target, objl_valid, every: int, n_batches: int = 2):
        import numpy as np
        from deepfinder.utils import core

        self.trainer, self.every = trainer, every
        data_list, target_list = core.load_dataset(path_data, path_target, trainer.h5_dset_name)
        state = np.random.get_state()
        self.batches = [
            trainer.generate_batch_from_array(
                data_list, target_list, trainer.batch_size, objl_valid
            )[:2]
            for _ in range(n_batches)
        ]
        np.random.set_state(state)
        self.trace: list[dict] = []

    def after_step(self, step: int) -> None:
        if step % self.every and step != 1:
            return
        import numpy as np

        n_classes = self.trainer.Ncl
        on, off, total_p, total_g = (np.zeros(n_classes) for _ in range(4))
        n_on, n_off = np.zeros(n_classes), np.zeros(n_classes)
        for batch, target in self.batches:
            predicted = self.trainer.net.predict(batch, verbose=0)
            for c in range(n_classes):
                p, g = predicted[..., c], target[..., c] > 0
                on[c] += p[g].sum()
                off[c] += p[~g].sum()
                n_on[c] += g.sum()
                n_off[c] += (~g).sum()
                total_p[c] += p.sum()
                total_g[c] += g.sum()

        def log10(values):
            return [round(float(np.log10(max(v, 1e-30))), 2) for v in values]

        entry = {
            "step": step,
            "log10_p_on_own_voxels": log10(on / np.maximum(n_on, 1)),
            "log10_p_elsewhere": log10(off / np.maximum(n_off, 1)),
            "soft_dice": [round(float(v), 4) for v in 2 * on / (total_p + total_g)],
        }
        self.trace.append(entry)
        print("probe " + json.dumps(entry), flush=True)


# Voxel F1 (DeepFinder's own validation metric) an object class must reach on the
# validation patches for the run to count as learned; a background-only network scores 0.
LEARNED_VOXEL_F1 = 0.2


def epoch_history(path: Path, n_classes: int) -> list[dict]:
    """Per epoch of ``net_train_history.h5``: mean train/valid loss and per-class valid metrics."""
    import numpy as np
    from deepfinder.utils import core

    if not path.exists():
        return []
    history = core.read_history(str(path))
    epochs = []
    for e in range(len(history["val_loss"])):
        epochs.append(
            {
                "epoch": e + 1,
                "train_loss": float(np.mean(history["loss"][e])),
                "valid_loss": float(np.mean(history["val_loss"][e])),
                # per class (background first), mean over the validation batches
                "valid_f1": [round(float(v), 4) for v in np.mean(history["val_f1"][e], axis=0)],
                "valid_precision": [
                    round(float(v), 4) for v in np.mean(history["val_precision"][e], axis=0)
                ],
                "valid_recall": [
                    round(float(v), 4) for v in np.mean(history["val_recall"][e], axis=0)
                ],
            }
        )
    assert all(len(e["valid_f1"]) == n_classes for e in epochs)
    return epochs


def validate_final(trainer, path_data, path_target, objl_valid, n_batches: int) -> dict:
    """DeepFinder's epoch-end validation, on the final weights (the budget may end mid-epoch).

    Same batches as its own validation (``generate_batch_from_array`` on the
    validation objects, bootstrap as in training), same metric (voxel precision,
    recall, F1 per class from scikit-learn on the argmax).
    """
    import numpy as np
    from deepfinder.utils import core
    from sklearn.metrics import precision_recall_fscore_support

    data_list, target_list = core.load_dataset(path_data, path_target, trainer.h5_dset_name)
    scores, predicted_counts = [], np.zeros(trainer.Ncl, dtype=np.int64)
    for _ in range(n_batches):
        batch, target, _ = trainer.generate_batch_from_array(
            data_list, target_list, trainer.batch_size, objl_valid
        )
        predicted = trainer.net.predict(batch, verbose=0).argmax(axis=-1).ravel()
        predicted_counts += np.bincount(predicted, minlength=trainer.Ncl)
        scores.append(
            precision_recall_fscore_support(
                target.argmax(axis=-1).ravel(),
                predicted,
                average=None,
                labels=trainer.label_list,
                zero_division=0,
            )
        )
    precision, recall, f1 = (np.mean([s[i] for s in scores], axis=0) for i in range(3))
    object_f1 = [float(v) for v in f1[1:]]
    return {
        "batches": n_batches,
        "valid_f1": [round(float(v), 4) for v in f1],
        "valid_precision": [round(float(v), 4) for v in precision],
        "valid_recall": [round(float(v), 4) for v in recall],
        "predicted_voxels": [int(n) for n in predicted_counts],
        "learned": max(object_f1) >= LEARNED_VOXEL_F1,
        "learned_rule": f"an object class reaches voxel F1 >= {LEARNED_VOXEL_F1} "
        "on the validation patches with the final weights",
    }


def train(args) -> None:
    from deepfinder.training import Train
    from deepfinder.utils.dataloader import Dataloader

    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path_data, path_target, objl_train, objl_valid = Dataloader()(args.dataset.rstrip("/") + "/")

    trainer = Train(Ncl=args.n_classes, dim_in=args.patch_size)
    trainer.path_out = str(out) + "/"
    # The parameter file of DeepFinder's command-line documentation, except the
    # batch size (a flag) and the epoch count: the wall-clock budget ends training.
    trainer.batch_size = args.batch_size
    trainer.epochs = 100000
    trainer.steps_per_epoch = args.steps_per_epoch
    trainer.steps_per_valid = args.steps_per_valid
    trainer.flag_direct_read = False
    trainer.flag_batch_bootstrap = True
    trainer.Lrnd = 13

    started = time.perf_counter()
    with open(out / "train.log", "w") as log:
        probe = None
        if args.trace_every:
            probe = ProbeTrace(trainer, path_data, path_target, objl_valid, args.trace_every)
        observer = BudgetObserver(args.minutes * 60.0, log, args.max_steps, probe)
        trainer.obs_list = [observer]
        stopped_by_budget = False
        try:
            trainer.launch(path_data, path_target, objl_train, objl_valid)
        except TrainingBudgetReached:
            stopped_by_budget = True
    train_seconds = time.perf_counter() - started
    weights = out / "net_weights_FINAL.h5"
    trainer.net.save(str(weights))
    final = validate_final(trainer, path_data, path_target, objl_valid, args.steps_per_valid)

    steps = len(observer.step_seconds)
    # All steps, the first (graph tracing) included, as cryocaps counts its own;
    # validation and history plots at epoch ends are left out of the step times.
    seconds_per_step = sum(observer.step_seconds) / steps if steps else None
    steady = observer.step_seconds[1:]
    write_json(
        out / "train.json",
        {
            "weights": str(weights),
            "steps": steps,
            "epochs_finished": observer.epochs_finished,
            "stopped_by_budget": stopped_by_budget,
            "budget_seconds": args.minutes * 60.0,
            "train_seconds": train_seconds,
            "step_seconds_total": sum(observer.step_seconds),
            "seconds_per_step": seconds_per_step,
            "samples_per_second": args.batch_size / seconds_per_step if seconds_per_step else None,
            "seconds_per_step_after_first": sum(steady) / len(steady) if steady else None,
            "batch_size": args.batch_size,
            "patch_size": args.patch_size,
            "steps_per_epoch": args.steps_per_epoch,
            "steps_per_valid": args.steps_per_valid,
            "max_steps": args.max_steps,
            "seed": args.seed,
            "first_loss": observer.losses[0] if observer.losses else None,
            "last_loss": observer.losses[-1] if observer.losses else None,
            "losses": observer.losses,
            "epochs": epoch_history(out / "net_train_history.h5", args.n_classes),
            "final_validation": final,
            "learned": final["learned"],
            "trace": probe.trace if probe else None,
            "train_tomograms": len({int(o["tomo_idx"]) for o in objl_train}),
            "train_objects": len(objl_train),
            "valid_objects": len(objl_valid),
        },
    )


# --------------------------------------------------------------------------- segment


def segment_patch_size(shape: tuple[int, int, int], requested: int, pcrop: int = 25) -> int:
    """Largest multiple of 4 <= requested that fits the zero-padded tomogram in every axis."""
    fits = min(shape) + 2 * pcrop
    return max(4, min(requested, fits) // 4 * 4)


def segment(args) -> None:
    import numpy as np
    from deepfinder.inference import Segment
    from deepfinder.utils import common as cm
    from deepfinder.utils import smap as sm

    started = time.perf_counter()
    tomogram = np.asarray(cm.read_array(args.tomogram), dtype=np.float32)
    patch_size = segment_patch_size(tomogram.shape, args.patch_size)
    seg = Segment(Ncl=args.n_classes, path_weights=args.weights, patch_size=patch_size)
    seg.obs_list = []
    launched = time.perf_counter()
    scoremaps = seg.launch(tomogram)
    predicted = time.perf_counter()
    labelmap = sm.to_labelmap(scoremaps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cm.write_array(labelmap, str(out))
    counts = np.bincount(labelmap.ravel().astype(np.int64), minlength=args.n_classes)
    write_json(
        out.with_suffix(".json"),
        {
            "tomogram": args.tomogram,
            "shape_zyx": list(tomogram.shape),
            "voxels": int(tomogram.size),
            "patch_size": patch_size,
            "launch_seconds": predicted - launched,
            "in_process_seconds": time.perf_counter() - started,
            "label_voxels": [int(n) for n in counts],
        },
    )


# --------------------------------------------------------------------------- cluster


def write_objl_csv(objl: list[dict], path: Path, tomo: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tomo", "label", "x", "y", "z", "cluster_size"])
        for obj in objl:
            writer.writerow(
                [
                    tomo,
                    int(obj["label"]),
                    float(obj["x"]),
                    float(obj["y"]),
                    float(obj["z"]),
                    int(obj["cluster_size"]),
                ]
            )
    os.replace(tmp, path)


def cluster(args) -> None:
    import numpy as np
    from deepfinder.inference import Cluster
    from deepfinder.utils import common as cm
    from deepfinder.utils import objl as ol

    labelmap = np.asarray(cm.read_array(args.labelmap)).astype(np.int8)
    present = sorted(int(v) for v in np.unique(labelmap) if v > 0)
    started = time.perf_counter()
    if present:
        clust = Cluster(clustRadius=int(args.radius_voxels))
        clust.obs_list = []
        # Cluster.launch counts each cluster's votes for labels 1..(number of labels
        # present), so when a class is missing from the map (say labels 2, 3, 4) the
        # highest label gets no vote and its objects come out as label 1. MeanShift
        # runs on the positions of all object voxels whatever their label, so handing
        # it ranks 1..N and mapping the winners back gives exactly what it computes
        # when every class is present.
        rank_of = np.zeros(int(labelmap.max()) + 1, dtype=np.int8)
        rank_of[present] = np.arange(1, len(present) + 1)
        objl = clust.launch(rank_of[labelmap])
        for obj in objl:
            obj["label"] = present[int(obj["label"]) - 1]
    else:
        objl = []  # MeanShift cannot run on an empty label map: nothing was found
    seconds = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ol.write_xml(objl, str(out))
    write_objl_csv(objl, out.with_suffix(".csv"), args.tomo)
    notes = []
    if present and present != list(range(1, len(present) + 1)):
        notes.append(
            f"labels present {present} are not 1..{len(present)}: handed to DeepFinder's "
            "Cluster as 1..N and mapped back (it would give the highest label's objects label 1)"
        )
    write_json(
        out.with_suffix(".json"),
        {
            "objects": len(objl),
            "labels_present": present,
            "cluster_seconds": seconds,
            "radius_voxels": int(args.radius_voxels),
            "notes": notes,
        },
    )


# --------------------------------------------------------------------------- filter


def filter_objects(args) -> None:
    from deepfinder.utils import objl as ol

    thresholds = parse_mapping(args.thresholds, int)
    labels = sorted(thresholds)
    thr_list = [thresholds.get(label, 1) for label in range(1, max(labels) + 1)]
    objl = ol.read_xml(args.objl)
    kept = ol.above_thr_per_class(objl, labels, thr_list)
    out = Path(args.out)
    ol.write_xml(kept, str(out))
    write_objl_csv(kept, out.with_suffix(".csv"), args.tomo)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)

    p = sub.add_parser("prepare", help="particle CSV -> DeepFinder data set folder")
    p.add_argument("--particles", required=True, help="CSV with tomo,label,x,y,z (0-based voxels)")
    p.add_argument("--radii-voxels", required=True, help='sphere radius per label, "1=5,2=3"')
    p.add_argument("--train", nargs="+", required=True, help="training tomograms (MRC)")
    p.add_argument("--valid", nargs="+", required=True, help="validation tomograms (MRC)")
    p.add_argument("--dataset", required=True, help="output folder")
    p.set_defaults(run=prepare)

    p = sub.add_parser("train", help="Train.launch under a wall-clock budget")
    p.add_argument("--dataset", required=True)
    p.add_argument("--n-classes", type=int, required=True, help="classes including background")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    p.add_argument("--patch-size", type=int, default=48, help="default 48 (its parameter file)")
    p.add_argument("--batch-size", type=int, default=2, help="default 2")
    p.add_argument("--steps-per-epoch", type=int, default=100, help="default 100")
    p.add_argument("--steps-per-valid", type=int, default=10, help="default 10")
    p.add_argument(
        "--max-steps", type=int, default=0, help="also stop after this many steps (0: no limit)"
    )
    p.add_argument(
        "--trace-every",
        type=int,
        default=0,
        help="every N steps, record per-class soft scores on 2 fixed validation batches (0: off)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=train)

    p = sub.add_parser("segment", help="Segment.launch -> label map MRC")
    p.add_argument("--tomogram", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--n-classes", type=int, required=True, help="classes including background")
    p.add_argument("--out", required=True, help="label map .mrc")
    p.add_argument(
        "--patch-size", type=int, default=160, help="default 160 (its example), shrunk to fit"
    )
    p.set_defaults(run=segment)

    p = sub.add_parser("cluster", help="Cluster.launch (MeanShift) -> object list")
    p.add_argument("--labelmap", required=True)
    p.add_argument("--radius-voxels", type=int, required=True, help="cluster radius (voxels)")
    p.add_argument("--tomo", required=True, help="tomogram name written in the CSV")
    p.add_argument(
        "--out", required=True, help="object list .xml (a .csv and .json are written beside)"
    )
    p.set_defaults(run=cluster)

    p = sub.add_parser("filter", help="objl.above_thr_per_class")
    p.add_argument("--objl", required=True)
    p.add_argument(
        "--thresholds", required=True, help='minimum cluster size per label, "1=50,2=20"'
    )
    p.add_argument("--tomo", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=filter_objects)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    restore_numpy_aliases()
    args.run(args)


if __name__ == "__main__":
    main()
