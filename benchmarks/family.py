"""A randomized family of simulated sets that does not saturate (issue 28, items 4 and 5).

``vs_deepfinder.py --family N`` runs it; this module holds the draws, the data, the
runs of each tool and the report. Draw k uses seed ``--seed + k`` for everything
random: its imaging, its classes, the particles, the annotated subsets and the
tools' own seeds, so a draw is made again exactly from its seed.

A draw picks
- imaging: SNR 0.1-0.5, tilt range ±45-70°, defocus 2-5 µm, a Gaussian blur of
  0-10 Å (``simulate --blur-angstrom``), crowding 0.1-0.3 of the slab;
- 3-5 particle classes: an assembly of point-like subunits (a ring, stacked rings,
  a helical filament segment or a hollow shell, with random subunit counts and
  sizes), two or three SHREC'19 classes of similar size that only shape tells apart,
  and for the other places another assembly or any map of the structures folder;
  one class of the draw gets a low contrast (density x 0.4-0.7). Every particle
  has a random orientation (uniform on SO(3)).

Each draw is 6 tomograms: 3 for training, 1 for validation (DeepFinder uses it, for
its validation batches and its cluster-size thresholds; cryocaps does not, by
default), 2 for the test, with at least ``MIN_TEST_PARTICLES`` particles between
them (the tomograms grow across the beam until that many fit), so that one pick
moves a class's F1 by less than 0.05.

With ``--annotated-fraction F`` the training and validation tomograms are annotated
with a random F of their particles of each class (seeded; at least one); their
label maps come from ``cryocaps make-masks`` of that subset, DeepFinder gets the
same subset, and the test tomograms are scored against all their particles.

Scores per draw, fraction and tool: per class precision, recall, F1 (the shared
matcher, ``cryocaps.evaluation.evaluate_picks``, tolerance 0.5 x radius, both test
tomograms), and the **background share**: voxels the tool's label map gives class c
where the true label map has no particle, over all such background voxels; divided
by the fraction of the tomograms the class's particles fill (its label spheres),
a ratio above ~3 is a class running away over the background.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _bench import (
    cryocaps_cmd,
    fmt,
    machine_sentence,
    repeat,
    replace_section,
    run_measured,
    say,
    train_cmd,
    training_summary,
    write_json_atomic,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_JSON = HERE / "results" / "family.json"
RESULTS_MD = HERE / "RESULTS.md"
START_MARK = "<!-- family:start -->"
END_MARK = "<!-- family:end -->"

# The twelve SHREC'19 classes (all in ../shared/data/structures as 10 Å maps).
SHREC19 = (
    "1bxn", "1qvr", "1s3x", "1u6g", "2cg9", "3cf3", "3d2f", "3gl1", "3h84", "3qm1", "4cr2", "4v4r",
)  # fmt: skip
ASSEMBLY_KINDS = ("ring", "stacked-rings", "filament", "shell")
# What each draw is drawn from (uniform in each range).
RANGES = {
    "snr": (0.1, 0.5),
    "tilt_range_deg": (45.0, 70.0),
    "defocus_um": (2.0, 5.0),
    "blur_angstrom": (0.0, 10.0),
    "crowding": (0.1, 0.3),
    "low_contrast": (0.4, 0.7),
}
N_CLASSES = (3, 5)
VOXEL_SIZE_ANGSTROM = 10.0  # the structures' maps are at 10 Å
N_TRAIN, N_VALID, N_TEST = 3, 1, 2
# One pick must not move a class by 0.05: >= 150 particles over the two test tomograms;
# each tomogram is planned for 80 (placement in a crowded slab may miss a few).
MIN_TEST_PARTICLES = 150
PLANNED_PER_TOMOGRAM = 80
# DeepFinder's training patch: its documented 48 where particles are dense enough for it
# to learn, 32 on sparse sets (vs_deepfinder.py: DOCUMENTED_DF_PATCH / SPARSE_DF_PATCH).
DF_DENSE_CROWDING = 0.2
# What is kept of the matcher's result for each class.
CLASS_SCORES = ("precision", "recall", "f1", "tp", "fp", "fn", "n_picks", "n_truth", "duplicates")


# --------------------------------------------------------------------------- draws


def assembly_parameters(kind: str, rng: np.random.Generator) -> dict:
    """Random parameters of one assembly (Å): subunits 10-15 Å, 2.2-2.8 subunit radii apart."""
    subunit = float(rng.uniform(10.0, 15.0))
    spacing = float(rng.uniform(2.2, 2.8)) * subunit  # centre to centre, neighbours in a ring
    if kind == "ring":
        n = int(rng.integers(7, 15))
        return {"n_subunits": n, "ring_radius_angstrom": n * spacing / (2 * math.pi),
                "subunit_radius_angstrom": subunit}  # fmt: skip
    if kind == "stacked-rings":
        n = int(rng.integers(7, 13))
        return {"n_rings": int(rng.integers(2, 5)), "n_subunits": n,
                "ring_radius_angstrom": n * spacing / (2 * math.pi),
                "subunit_radius_angstrom": subunit,
                "ring_spacing_angstrom": float(rng.uniform(2.0, 2.4)) * subunit}  # fmt: skip
    if kind == "filament":
        return {"n_subunits": int(rng.integers(8, 15)),
                "helix_radius_angstrom": float(rng.uniform(12.0, 25.0)),
                "rise_angstrom": float(rng.uniform(12.0, 16.0)),
                "twist_deg": float(rng.uniform(150.0, 175.0) * rng.choice([-1, 1])),
                "subunit_radius_angstrom": subunit}  # fmt: skip
    if kind == "shell":
        n = int(rng.integers(20, 61))
        # area per subunit ~ spacing²: 4 pi R² = n spacing²
        return {"n_subunits": n, "shell_radius_angstrom": spacing * math.sqrt(n / (4 * math.pi)),
                "subunit_radius_angstrom": subunit}  # fmt: skip
    raise ValueError(f"unknown assembly kind {kind!r}")


def assembly_name(kind: str, parameters: dict) -> str:
    """``ring9``, ``rings3x10``, ``filament12``, ``shell40``: the kind and its subunit count."""
    n = parameters["n_subunits"]
    if kind == "stacked-rings":
        return f"rings{parameters['n_rings']}x{n}"
    return f"{kind}{n}"


def read_diameters(structures: Path) -> dict[str, float]:
    """Diameter (Å) of each structure from the folder's summary.csv (``id,diameter_angstrom``)."""
    import pandas as pd

    table = pd.read_csv(structures / "summary.csv")
    return {str(k): float(v) for k, v in zip(table["id"], table["diameter_angstrom"], strict=True)}


def similar_size_classes(rng: np.random.Generator, diameters: dict[str, float], n: int) -> list:
    """A random SHREC'19 class and the ``n - 1`` others nearest to it in diameter."""
    anchor = str(rng.choice(SHREC19))
    others = sorted(
        (c for c in SHREC19 if c != anchor),
        key=lambda c: (abs(math.log(diameters[c] / diameters[anchor])), c),
    )
    return [anchor, *others[: n - 1]]


def draw_set(seed: int, structures: Path) -> dict:
    """The imaging and the classes of draw ``seed`` (JSON-ready; no file is read but summary.csv).

    Every class: ``name``, ``kind`` (assembly, similar-size, map), ``contrast`` (density
    factor, 1 unless it is the draw's low-contrast class) and either ``shape`` +
    ``parameters`` (an assembly) or ``structure`` (a map's class name).
    """
    rng = np.random.default_rng(seed)
    draw = {"seed": seed}
    for key in ("snr", "tilt_range_deg", "defocus_um", "blur_angstrom", "crowding"):
        draw[key] = round(float(rng.uniform(*RANGES[key])), 3)
    n_classes = int(rng.integers(N_CLASSES[0], N_CLASSES[1] + 1))
    diameters = read_diameters(structures)
    n_similar = 3 if n_classes == 5 and rng.random() < 0.5 else 2
    kinds = list(rng.permutation(ASSEMBLY_KINDS))  # assemblies of different kinds
    classes = []

    def add_assembly() -> None:
        kind = str(kinds.pop())
        parameters = assembly_parameters(kind, rng)
        classes.append({"name": assembly_name(kind, parameters), "kind": "assembly",
                        "shape": kind, "parameters": parameters})  # fmt: skip

    add_assembly()
    for name in similar_size_classes(rng, diameters, n_similar):
        classes.append({"name": name, "kind": "similar-size", "structure": name})
    while len(classes) < n_classes:
        taken = {c.get("structure") for c in classes}
        maps = sorted(name for name in diameters if name not in taken)
        if rng.random() < 0.5 and kinds:
            add_assembly()
        else:
            name = str(rng.choice(maps))
            classes.append({"name": name, "kind": "map", "structure": name})
    faint = int(rng.integers(len(classes)))
    for k, spec in enumerate(classes):
        spec["contrast"] = 1.0
        if k == faint:
            spec["contrast"] = round(float(rng.uniform(*RANGES["low_contrast"])), 3)
            spec["name"] += "-faint"
    draw["classes"] = classes
    return draw


def class_templates(draw: dict, structures: Path, voxel_size_angstrom: float) -> list:
    """The draw's classes as :class:`cryocaps.structures.ParticleTemplate`, in draw order."""
    from dataclasses import replace

    from cryocaps import assemblies
    from cryocaps import structures as built

    builders = {
        "ring": assemblies.subunit_ring,
        "stacked-rings": assemblies.stacked_rings,
        "filament": assemblies.filament_segment,
        "shell": assemblies.hollow_shell,
    }
    templates = []
    for spec in draw["classes"]:
        if spec["kind"] == "assembly":
            shapes = builders[spec["shape"]](**spec["parameters"])
            template = built.shapes_template(spec["name"], shapes, voxel_size_angstrom)
        else:
            (template,) = built.load_structure_templates(
                structures, voxel_size_angstrom, names=[spec["structure"]]
            )
        if spec["contrast"] != 1.0:
            template = built.with_contrast(template, spec["contrast"], spec["name"])
        templates.append(replace(template, name=spec["name"]))
    return templates


def plan_shape(base_shape, crowding: float, radii_voxels, per_tomogram: int) -> tuple:
    """The tomogram shape: ``base_shape`` grown across the beam (Y, X, multiples of 16) until
    ``crowding`` of its slab holds ``per_tomogram`` particles of these radii (split evenly, as
    ``simulate`` does), and deep enough for the largest (slab = 80% of Z)."""
    z, y, x = (int(n) for n in base_shape)
    largest = 2 * math.ceil(max(radii_voxels)) + 3
    while 0.8 * z < largest:
        z += 8
    mean_volume = float(np.mean([4 / 3 * math.pi * r**3 for r in radii_voxels]))
    expected = crowding * 0.8 * z * y * x / mean_volume
    if expected < per_tomogram:
        grow = math.sqrt(per_tomogram / expected)
        y, x = (int(math.ceil(n * grow / 16) * 16) for n in (y, x))
    return (z, y, x)


# --------------------------------------------------------------------------- data


def tomogram_roles(names: list[str]) -> dict:
    """tomo_01-03 train, tomo_04 validation, tomo_05-06 test."""
    return {
        "train": names[:N_TRAIN],
        "valid": names[N_TRAIN],
        "test": names[N_TRAIN + N_VALID :],
    }


def simulate_draw(draw: dict, args, folder: Path) -> dict:
    """Simulate the draw's 6 tomograms into ``folder`` (kept with ``--reuse-data`` when the
    same draw made them); the paths by role and what the simulation measured."""
    from cryocaps.simulate import SimulationParameters, simulate_dataset

    stamp = folder / "draw.json"
    templates = class_templates(draw, args.structures, VOXEL_SIZE_ANGSTROM)
    radii = [t.radius_voxels for t in templates]
    per_tomogram = 0 if args.quick else PLANNED_PER_TOMOGRAM
    shape = plan_shape(args.family_shape, draw["crowding"], radii, per_tomogram)
    params = SimulationParameters(
        n_tomograms=N_TRAIN + N_VALID + N_TEST,
        shape=shape,
        voxel_size_angstrom=VOXEL_SIZE_ANGSTROM,
        snr=draw["snr"],
        tilt_range_deg=draw["tilt_range_deg"],
        defocus_um=draw["defocus_um"],
        blur_angstrom=draw["blur_angstrom"],
        crowding=draw["crowding"],
        seed=draw["seed"],
    )
    planned = draw | {"shape": list(shape)}
    if args.reuse_data and stamp.exists() and json.loads(stamp.read_text()) == planned:
        say(f"draw {draw['seed']}: reusing simulated data in {folder}")
        summary = json.loads((folder / "simulate_summary.json").read_text())
    else:
        if folder.exists():
            shutil.rmtree(folder)
        say(f"draw {draw['seed']}: simulating {params.n_tomograms} tomograms {shape}, "
            f"classes {', '.join(t.name for t in templates)}")  # fmt: skip
        started = time.perf_counter()
        summary = simulate_dataset(folder, templates, params)
        summary["seconds"] = time.perf_counter() - started
        summary.pop("outputs")
        (folder / "simulate_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        stamp.write_text(json.dumps(planned))
    names = sorted(summary["tomograms"])
    roles = tomogram_roles(names)
    tomogram = {name: folder / "tomograms" / f"{name}.mrc" for name in names}
    return {
        "draw": planned,
        "folder": folder,
        "classes_csv": folder / "classes.csv",
        "particles": folder / "particles.csv",
        "names": roles,
        "train": [tomogram[n] for n in roles["train"]],
        "valid": tomogram[roles["valid"]],
        "test": [tomogram[n] for n in roles["test"]],
        "test_truth_labels": [folder / "labels" / f"{n}.mrc" for n in roles["test"]],
        "simulate": summary,
    }


def annotated_subset(particles, tomograms: list[str], fraction: float, seed: int):
    """A random ``fraction`` of each tomogram's particles of each class (at least one), for the
    named tomograms; the same seed and fraction give the same subset."""
    import pandas as pd

    rng = np.random.default_rng([seed, round(fraction * 1000)])
    chosen = []
    own = particles[particles["tomo"].isin(tomograms)]
    for _key, group in own.groupby(["tomo", "class_name"], sort=True):
        keep = len(group) if fraction >= 1 else max(1, round(fraction * len(group)))
        chosen.append(group.iloc[np.sort(rng.choice(len(group), keep, replace=False))])
    return pd.concat(chosen, ignore_index=True)


def make_annotations(data: dict, fraction: float, args, folder: Path) -> dict:
    """The annotated particles of the training and validation tomograms and their label maps
    (``cryocaps make-masks``)."""
    particles = data["truth"]
    tomograms = [*data["names"]["train"], data["names"]["valid"]]
    subset = annotated_subset(particles, tomograms, fraction, data["draw"]["seed"])
    folder.mkdir(parents=True, exist_ok=True)
    subset_csv = folder / "annotated.csv"
    subset.to_csv(subset_csv, index=False)
    masks = folder / "labels"
    if masks.exists():
        shutil.rmtree(masks)
    run_measured(
        cryocaps_cmd(
            "make-masks",
            subset_csv,
            "-o",
            masks,
            *repeat("--tomograms", [*data["train"], data["valid"]]),
            "--classes",
            data["classes_csv"],
            *shlex.split(args.masks_args),
        ),
        folder / "logs" / "make_masks.log",
    )
    return {
        "fraction": fraction,
        "particles_csv": subset_csv,
        "particles": subset,
        "train_labels": [masks / f"{t.stem}_labels.mrc" for t in data["train"]],
        "n_annotated": {name: int((subset["tomo"] == name).sum()) for name in tomograms},
        "n_particles": {name: int((particles["tomo"] == name).sum()) for name in tomograms},
    }


# --------------------------------------------------------------------------- scores


def read_labels(path: Path) -> np.ndarray:
    """A label map as int64 (DeepFinder writes voxel size 0 in its headers: not needed here)."""
    from cryocaps.io.volumes import read_tomogram

    label_map = read_tomogram(path, voxel_size_angstrom=VOXEL_SIZE_ANGSTROM, check_finite=False)
    return np.asarray(label_map.data).astype(np.int64)


def background_share(predicted_paths, truth_paths, n_labels: int) -> dict:
    """Per label: voxels predicted that label where the truth is background, over all
    background voxels (``share``), and the fraction of all voxels the label's true particles
    fill (``true_fraction``), summed over the tomograms."""
    from cryocaps.evaluation import background_counts

    on_background = np.zeros(n_labels, dtype=np.int64)
    true_counts = np.zeros(n_labels, dtype=np.int64)
    for predicted_path, truth_path in zip(predicted_paths, truth_paths, strict=True):
        predicted, truth = read_labels(predicted_path), read_labels(truth_path)
        if predicted.shape != truth.shape:
            raise ValueError(f"{predicted_path}: shape {predicted.shape}, truth {truth.shape}")
        on_background += background_counts(predicted, truth, n_labels)
        true_counts += np.bincount(truth.ravel(), minlength=n_labels)[:n_labels]
    background = int(true_counts[0])
    total = int(true_counts.sum())
    return {
        "share": (on_background / max(background, 1)).tolist(),
        "true_fraction": (true_counts / max(total, 1)).tolist(),
        "background_voxels": background,
        "voxels": total,
    }


def score_tool(picks, truth, classes, test_names: list[str], shares: dict | None) -> dict:
    """Macro and worst-class F1 and, per class, precision/recall/F1, counts and background share."""
    from cryocaps.evaluation import evaluate_picks

    truth = truth[truth["tomo"].astype(str).isin(test_names)]
    picks = picks[picks["tomo"].astype(str).isin(test_names)]
    result = evaluate_picks(picks, truth, classes, VOXEL_SIZE_ANGSTROM, tomograms=test_names)
    per_class = {}
    for particle_class in classes:
        entry = result["classes"][particle_class.name]
        row = {key: entry.get(key) for key in CLASS_SCORES}
        if shares is not None:
            share = shares["share"][particle_class.label]
            fraction = shares["true_fraction"][particle_class.label]
            row["background_share"] = share
            row["true_fraction"] = fraction
            row["background_ratio"] = share / fraction if fraction > 0 else None
        per_class[particle_class.name] = row
    f1s = [row["f1"] or 0.0 for row in per_class.values()]
    return {
        "macro_f1": result["macro"]["f1"],
        "worst_class_f1": min(f1s) if f1s else None,
        "n_picks": len(picks),
        "classes": per_class,
    }


# --------------------------------------------------------------------------- tools

TRAINED = "trained.json"  # a tool's training measurements and settings, beside its model


def reused_training(args, folder: Path, model_file: Path, settings: dict) -> dict | None:
    """With ``--reuse-training``: what the earlier training of the model in ``folder`` measured,
    when it was trained with the same ``settings`` (else None: train afresh)."""
    record = folder / TRAINED
    if not (args.reuse_training and model_file.exists() and record.exists()):
        return None
    earlier = json.loads(record.read_text())
    if earlier.get("settings") != settings:
        return None
    say(f"{folder.name}: reusing the model trained earlier in {folder}")
    return earlier


def keep_training(folder: Path, settings: dict, measured: dict) -> None:
    (folder / TRAINED).write_text(json.dumps({"settings": settings} | measured, default=str))


# Picking levers scored on every cryocaps tool's test label maps (no training of their own):
# key suffix -> extra cluster-picks options. The entries are "<tool key>:<suffix>". The
# default column picks each class with the method its held-out validation chose; the two
# fixed methods are what that choice has to beat.
PICK_LEVERS = {"meanshift": ["--method", "meanshift"], "components": ["--method", "components"]}


def run_cryocaps_tool(model: str, data, annotations, args, folder: Path, classes, truth) -> dict:
    """``cryocaps train`` (defaults, no validation tomogram) -> ``segment`` the test tomograms
    -> ``cluster-picks`` at its defaults; scored. Also the same label maps picked with each of
    :data:`PICK_LEVERS`. Returns ``{tool key: result, "<tool key>:<lever>": result, ...}``."""
    import vs_deepfinder as vs

    from cryocaps.io.particles import read_particles

    run_dir, seg_dir, logs = folder / "model", folder / "segment", folder / "logs"
    settings = {"minutes": args.minutes, "train_args": args.train_args}
    earlier = reused_training(args, folder, run_dir / "model.pt", settings)
    vs.fresh_folder(folder, keep=["model", TRAINED] if earlier else [])
    if earlier:
        train = earlier["train"] | {"reused_from_earlier_run": True}
    else:
        say(f"cryocaps {model}: train {args.minutes:g} min")
        train = run_measured(
            train_cmd(data["train"], annotations["train_labels"], data["classes_csv"], run_dir,
                      model, args.minutes, data["draw"]["seed"], *shlex.split(args.train_args)),
            logs / "train.log",
        )  # fmt: skip
        train |= training_summary(run_dir)
        keep_training(folder, settings, {"train": train})
    say(f"cryocaps {model}: segment {', '.join(t.name for t in data['test'])}")
    segment = run_measured(
        cryocaps_cmd("segment", *data["test"], "--model", run_dir, "-o", seg_dir),
        logs / "segment.log",
    )
    label_maps = [seg_dir / f"{t.stem}_labels.mrc" for t in data["test"]]
    picks_csv = folder / "picks.csv"
    pick = run_measured(
        cryocaps_cmd("cluster-picks", *label_maps, "-o", picks_csv, "--classes",
                     data["classes_csv"], *shlex.split(args.pick_args)),
        logs / "cluster_picks.log",
    )  # fmt: skip
    picks = read_particles([picks_csv], classes=classes)
    shares = background_share(label_maps, data["test_truth_labels"], classes.n_labels)
    names = [t.stem for t in data["test"]]
    label = " ".join(w for w in ("cryocaps", model, args.train_args) if w)
    key = f"cryocaps-{model}"
    results = {
        key: {
            "tool": label,
            "train": train,
            "segment": segment,
            "pick": pick,
            **score_tool(picks, truth, classes, names, shares),
        }
    }
    for lever, options in PICK_LEVERS.items():
        lever_csv = folder / f"picks_{lever}.csv"
        timed = run_measured(
            cryocaps_cmd("cluster-picks", *label_maps, "-o", lever_csv, "--classes",
                         data["classes_csv"], *shlex.split(args.pick_args), *options),
            logs / f"cluster_picks_{lever}.log",
        )  # fmt: skip
        lever_picks = read_particles([lever_csv], classes=classes)
        results[f"{key}:{lever}"] = {
            "tool": f"{label} ({shlex.join(options)}, same maps)",
            "pick": timed,
            **score_tool(lever_picks, truth, classes, names, shares),
        }
    return results


def run_deepfinder_tool(data, annotations, args, folder: Path, classes, truth) -> dict:
    """DeepFinder 0.2.1 on the same annotated particles: TargetBuilder, Train, Segment and
    Cluster on the validation and test tomograms; its raw picks and the picks kept by
    per-class cluster-size thresholds tuned on the (equally annotated) validation tomogram."""
    import vs_deepfinder as vs

    logs = folder / "logs"
    n_classes = classes.n_labels
    radii = {c.label: c.radius_angstrom / VOXEL_SIZE_ANGSTROM for c in classes}
    cluster_radius = max(1, round(sum(radii.values()) / len(radii)))
    particles = annotations["particles"].copy()
    particles["label"] = [classes.by_name(name).label for name in particles["class_name"]]
    df_args = copy.copy(args)
    df_args.seed = data["draw"]["seed"]
    crowding = data["draw"]["crowding"]
    patch = args.df_patch_size or (
        vs.DOCUMENTED_DF_PATCH if crowding >= DF_DENSE_CROWDING else vs.SPARSE_DF_PATCH
    )
    df_data = {"train": data["train"], "valid": data["valid"], "df_patch_size": patch}
    weights = folder / "model" / "net_weights_FINAL.h5"
    settings = {"minutes": args.df_minutes, "max_steps": args.df_max_steps, "patch": patch,
                "batch_size": args.df_batch_size}  # fmt: skip
    earlier = reused_training(args, folder, weights, settings)
    vs.fresh_folder(folder, keep=["model", "dataset", TRAINED] if earlier else [])
    folder.mkdir(parents=True, exist_ok=True)
    particles_csv = folder / "particles_labels.csv"
    particles[["tomo", "label", "x", "y", "z"]].to_csv(particles_csv, index=False)
    if earlier:
        prepare = earlier["prepare"]
        train = earlier["train"] | {"reused_from_earlier_run": True}
    else:
        prepare, train = vs.train_deepfinder(
            df_data, df_args, folder, n_classes, radii, particles_csv
        )
        keep_training(folder, settings, {"prepare": prepare, "train": train})

    segments, clusters, objls, label_maps = {}, {}, {}, {}
    for tomogram in [data["valid"], *data["test"]]:
        name = tomogram.stem
        say(f"DeepFinder: segment and cluster {name}")
        label_maps[name] = folder / "segment" / f"{name}_labelmap.mrc"
        segments[name] = run_measured(
            vs.driver_cmd("segment", "--tomogram", tomogram, "--weights", weights,
                          "--n-classes", n_classes, "--out", label_maps[name]),
            logs / f"segment_{name}.log",
        )  # fmt: skip
        segments[name] |= json.loads(label_maps[name].with_suffix(".json").read_text())
        objls[name] = folder / "picks" / f"{name}_objl_raw.xml"
        clusters[name] = run_measured(
            vs.driver_cmd("cluster", "--labelmap", label_maps[name], "--radius-voxels",
                          cluster_radius, "--tomo", name, "--out", objls[name]),
            logs / f"cluster_{name}.log",
        )  # fmt: skip

    valid_name = data["valid"].stem
    valid_truth = annotations["particles"]
    valid_picks = vs.deepfinder_picks(objls[valid_name].with_suffix(".csv"), classes)
    thresholds = vs.choose_thresholds(valid_picks, valid_truth, classes, data["valid"])
    say(f"DeepFinder: cluster-size thresholds from validation {thresholds}")
    import pandas as pd

    raw, kept = [], []
    for tomogram in data["test"]:
        name = tomogram.stem
        filtered = folder / "picks" / f"{name}_objl_thr.xml"
        run_measured(
            vs.driver_cmd("filter", "--objl", objls[name], "--tomo", name, "--out", filtered,
                          "--thresholds", ",".join(f"{k}={t}" for k, t in thresholds.items())),
            logs / f"filter_{name}.log",
        )  # fmt: skip
        raw.append(vs.deepfinder_picks(objls[name].with_suffix(".csv"), classes))
        kept.append(vs.deepfinder_picks(filtered.with_suffix(".csv"), classes))
    test_names = [t.stem for t in data["test"]]
    shares = background_share(
        [label_maps[n] for n in test_names], data["test_truth_labels"], n_classes
    )
    test_segments = [segments[n] for n in test_names]
    combined_segment = {
        key: sum(s[key] for s in test_segments) for key in ("wall_seconds", "cpu_seconds")
    } | {
        "peak_rss_bytes": max(s["peak_rss_bytes"] for s in test_segments),
        "label_voxels": [int(sum(v)) for v in zip(*(s["label_voxels"] for s in test_segments),
                                                  strict=True)],
    }  # fmt: skip
    common = {
        "prepare": prepare,
        "train": train,
        "segment": combined_segment,
        "pick": {"wall_seconds": sum(clusters[n]["wall_seconds"] for n in test_names)},
        "learned": vs.deepfinder_learned(train, combined_segment),
        "cluster_radius_voxels": cluster_radius,
        "patch_size": patch,
    }
    return {
        "deepfinder": {
            "tool": "DeepFinder 0.2.1 (raw Cluster picks)",
            **common,
            **score_tool(pd.concat(raw, ignore_index=True), truth, classes, test_names, shares),
        },
        "deepfinder-tuned": {
            "tool": "DeepFinder 0.2.1 (size thresholds tuned on validation)",
            **common,
            "thresholds": {classes.by_label(k).name: t for k, t in thresholds.items()},
            **score_tool(pd.concat(kept, ignore_index=True), truth, classes, test_names, shares),
        },
    }


# --------------------------------------------------------------------------- summary


def fraction_key(fraction: float) -> str:
    return f"{fraction:g}"


def summarize(draws: list[dict]) -> dict:
    """Per fraction and tool, over the draws: mean and worst macro F1, mean worst-class F1, the
    largest background ratio, the classes with precision < 0.8 at recall >= 0.5, and the ratio
    to the fully annotated macro F1 (per draw, then averaged)."""
    summary = {}
    fractions = sorted({f for d in draws for f in d.get("fractions", {})}, key=float, reverse=True)
    for fraction in fractions:
        tools = {}
        for draw in draws:
            for key, entry in draw.get("fractions", {}).get(fraction, {}).get("tools", {}).items():
                tools.setdefault(key, []).append((draw, entry))
        summary[fraction] = {}
        for key, entries in tools.items():
            done = [
                (d, e) for d, e in entries if "error" not in e and e.get("macro_f1") is not None
            ]
            macro = [e["macro_f1"] for _, e in done]
            ratios = [
                c["background_ratio"]
                for _, e in done
                for c in e["classes"].values()
                if c.get("background_ratio") is not None
            ]
            imprecise = [
                f"{name} (draw {d['draw']['seed']})"
                for d, e in done
                for name, c in e["classes"].items()
                if (c.get("recall") or 0) >= 0.5 and (c.get("precision") or 0) < 0.8
            ]
            to_full = []
            for d, e in done if float(fraction) < 1 else []:
                full = d["fractions"].get("1", {}).get("tools", {}).get(key, {})
                if full.get("macro_f1"):
                    to_full.append(e["macro_f1"] / full["macro_f1"])
            summary[fraction][key] = {
                "tool": entries[0][1].get("tool", key),
                "n_draws": len(done),
                "n_failed": len(entries) - len(done),
                "mean_macro_f1": float(np.mean(macro)) if macro else None,
                "worst_macro_f1": min(macro) if macro else None,
                "mean_worst_class_f1": float(np.mean([e["worst_class_f1"] for _, e in done]))
                if done
                else None,
                "max_background_ratio": max(ratios) if ratios else None,
                "imprecise_classes": imprecise,
                "mean_ratio_to_full": float(np.mean(to_full)) if to_full else None,
            }
    return summary


# --------------------------------------------------------------------------- report


def structures_label(structures: Path) -> str:
    """The structures folder as a path relative to the repository (no machine's path)."""
    return os.path.relpath(Path(structures).resolve(), REPO)


def describe_class(spec: dict) -> str:
    if spec["kind"] == "assembly":
        p = spec["parameters"]
        size = {
            "ring": f"ring radius {p.get('ring_radius_angstrom', 0):.0f} Å",
            "stacked-rings": f"{p.get('n_rings')} rings of radius "
            f"{p.get('ring_radius_angstrom', 0):.0f} Å",
            "filament": f"rise {p.get('rise_angstrom', 0):.0f} Å, twist "
            f"{p.get('twist_deg', 0):.0f}°, radius {p.get('helix_radius_angstrom', 0):.0f} Å",
            "shell": f"shell radius {p.get('shell_radius_angstrom', 0):.0f} Å",
        }[spec["shape"]]
        subunits = f"{p['n_subunits']} subunits of {p['subunit_radius_angstrom']:.0f} Å"
        text = f"{spec['shape']}, {subunits}, {size}"
    elif spec["kind"] == "similar-size":
        text = "SHREC'19, similar size"
    else:
        text = "map"
    if spec["contrast"] != 1.0:
        text += f", **contrast × {spec['contrast']:.2f}**"
    return text


def first_line(error: str) -> str:
    return error.splitlines()[0] if error else ""


def cell(row: dict) -> str:
    """``P 0.91 R 0.85 F1 0.88, bg 0.2×`` for one class and tool."""
    text = f"P {fmt(row.get('precision'))} R {fmt(row.get('recall'))} F1 {fmt(row.get('f1'))}"
    ratio = row.get("background_ratio")
    if ratio is not None:
        text += f", bg {ratio:.1f}×" if ratio < 3 else f", **bg {ratio:.1f}×**"
    return text


def summary_lines(summary: dict) -> list[str]:
    fractions = list(summary)
    tools = list(dict.fromkeys(key for f in fractions for key in summary[f]))
    header = "| tool | " + " | ".join(
        f"annotated {float(f):.0%}: macro F1 mean / worst (mean worst class)" for f in fractions
    )
    lines = [
        header + " | largest background ratio | classes P < 0.8 at R ≥ 0.5 |",
        "|---" * (len(fractions) + 3) + "|",
    ]
    ran = {f: {k: s["n_draws"] + s["n_failed"] for k, s in summary[f].items()} for f in fractions}
    most = max((n for f in fractions for n in ran[f].values()), default=0)
    for key in tools:
        cells, ratios, imprecise = [], [], []
        name = key
        for f in fractions:
            s = summary[f].get(key)
            if not s:
                cells.append("–")
                continue
            name = s["tool"]
            text = (
                f"{fmt(s['mean_macro_f1'])} / {fmt(s['worst_macro_f1'])} "
                f"({fmt(s['mean_worst_class_f1'])})"
            )
            if float(f) < 1 and s.get("mean_ratio_to_full") is not None:
                text += f" ({s['mean_ratio_to_full']:.2f} × full)"
            if ran[f][key] < most:
                text += f" ({ran[f][key]} draw{'s' if ran[f][key] != 1 else ''})"
            if s["n_failed"]:
                text += f" ({s['n_failed']} failed)"
            cells.append(text)
            if s["max_background_ratio"] is not None:
                ratios.append(s["max_background_ratio"])
            imprecise += s["imprecise_classes"]
        largest = fmt(max(ratios) if ratios else None, ".1f", "×")
        listed = ", ".join(imprecise) if imprecise else "none"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {largest} | {listed} |")
    return lines


def draw_lines(draw: dict) -> list[str]:
    d = draw["draw"]
    lines = [
        f"#### Draw {d['seed']}: SNR {d['snr']:.2f}, tilt ±{d['tilt_range_deg']:.0f}°, defocus "
        f"{d['defocus_um']:.1f} µm, blur {d['blur_angstrom']:.1f} Å, crowding {d['crowding']:.2f}, "
        f"tomograms {'×'.join(map(str, d['shape']))} voxels, "
        f"{draw.get('n_test_particles', '?')} test particles",
        "",
    ]
    if "error" in draw:
        return [*lines, f"FAILED: `{first_line(draw['error'])}`", ""]
    specs = {c["name"]: c for c in d["classes"]}
    for fraction, result in draw.get("fractions", {}).items():
        tools = result["tools"]
        lines += [
            f"Annotated {float(fraction):.0%} of the training and validation particles:",
            "",
            "| class | test particles | " + " | ".join(e.get("tool", k) for k, e in tools.items())
            + " |",
            "|---" * (len(tools) + 2) + "|",
        ]  # fmt: skip
        lines.append(
            "| **macro F1** | | "
            + " | ".join("FAILED" if "error" in e else fmt(e["macro_f1"]) for e in tools.values())
            + " |"
        )
        for name, spec in specs.items():
            counts = draw.get("test_particles_per_class", {}).get(name, "?")
            cells = [
                "–" if "error" in e else cell(e["classes"].get(name, {})) for e in tools.values()
            ]
            lines.append(
                f"| {name} ({describe_class(spec)}) | {counts} | " + " | ".join(cells) + " |"
            )
        for e in tools.values():
            if "error" in e:
                lines.append(f"\n{e['tool']} FAILED: `{first_line(e['error'])}`")
            if e.get("learned") and not e["learned"].get("verdict"):
                lines.append(f"\n{e['tool']}: **did not learn** (its numbers mean nothing).")
        lines.append("")
    return lines


def markdown_section(run: dict | None, plumbing: dict | None, after_run: Sequence[str] = ()) -> str:
    """The family section of RESULTS.md: what a draw is, the command, the latest full run, and
    ``after_run`` (e.g. the lever runs' tables)."""
    lines = [
        START_MARK,
        "## A randomized family of sets (`benchmarks/vs_deepfinder.py --family N`)",
        "",
        "Four fixed sets stopped telling defaults apart (0.97-1.00 for every cryocaps model), so "
        "defaults are judged on a family of random sets. Draw k (seed k, everything reproducible "
        "from it) picks its imaging (SNR 0.1-0.5, tilt range ±45-70°, defocus 2-5 µm, Gaussian "
        "blur 0-10 Å, crowding 0.1-0.3) and 3-5 classes: an assembly of point-like subunits "
        "(a ring, stacked rings, a helical filament segment or a hollow shell, random subunit "
        "counts and sizes), two or three SHREC'19 classes of similar size that only shape tells "
        "apart, and another assembly or any map of `../shared/data/structures` in the other "
        "places; one class per draw has its density scaled by 0.4-0.7 (low contrast); every "
        "particle has a random orientation. Six tomograms per draw: 3 for training, 1 for "
        "validation (DeepFinder's validation batches and cluster-size thresholds; cryocaps does "
        "not use it), 2 for the test, which hold at least 150 particles (the tomograms grow "
        "across the beam until they do). Every tool gets the same wall-clock training budget; "
        "cryocaps runs at CLI defaults (`train`, `segment`, `cluster-picks`), DeepFinder 0.2.1 "
        "as in the section above (raw Cluster picks, and with size thresholds tuned on the "
        "validation tomogram). `--annotated-fraction 0.1,0.3,1` annotates a random share of the "
        "training and validation particles of each class (labels from `make-masks` of that "
        "subset; DeepFinder trains on the same), and scores the test tomograms against all "
        "their particles. cryocaps picks each class with the method (connected components or "
        "mean shift) its held-out validation chose; its test label maps are also picked with "
        "each method for every class (`--method meanshift`, `--method components`: picking "
        "levers on the same maps, no training of their own), which the choice has to beat. "
        "**Background ratio**: the share of the true background a class's "
        "label map takes, divided by the fraction of the tomograms its particles fill; above 3 "
        "the class runs away over the background.",
        "",
        "Command: `python benchmarks/vs_deepfinder.py --family 5 --annotated-fraction 0.1,0.3,1` "
        "(training alone takes 4 tools × 12 min for each of the 15 draw-fraction pairs, 12 h; "
        "`--quick` checks the plumbing on one small draw). A run stopped part-way goes on "
        "with the same command and `--resume` (finished tools are kept); `--record-partial` "
        "adds the draws finished so far to the results, marked unfinished.",
        "",
    ]
    if run is None:
        lines.append("No full run of the family yet.")
    else:
        if run.get("partial"):
            title = (
                f"### Unfinished run, recorded {run['finished']} UTC: {len(run['draws'])} of "
                f"{run['draws_planned']} draws, {run['settings']['minutes']:g} min of training per "
                "tool"
            )
        else:
            title = (
                f"### Run {run['finished']} UTC: {len(run['draws'])} draws, "
                f"{run['settings']['minutes']:g} min training per tool"
            )
        resumed = f" (resumed {', '.join(run['resumed'])} UTC)" if run.get("resumed") else ""
        lines += [
            title,
            "",
            f"Started {run['started']} UTC{resumed}.",
            "",
            f"Command: `{run['command']}`",
            "",
            machine_sentence(run["machine"]),
            "",
            *summary_lines(run["summary"]),
            "",
        ]
        for draw in run["draws"]:
            lines += draw_lines(draw)
    lines += list(after_run)
    if plumbing is not None:
        entries = [(k, e) for d in plumbing["draws"] for f in d.get("fractions", {}).values()
                   for k, e in f["tools"].items()]  # fmt: skip
        ran = sorted({k for k, e in entries if "error" not in e})
        failed = sorted({k for k, e in entries if "error" in e})
        lines += [
            "",
            f"Last plumbing check (`--quick`, numbers mean nothing): {plumbing['finished']} UTC, "
            f"{plumbing['total_seconds'] / 60:.0f} min, ran end to end for {', '.join(ran)}"
            + (f"; FAILED: {', '.join(failed)}" if failed else "")
            + ".",
        ]
    lines += ["", "Raw numbers: `benchmarks/results/family.json` (every run kept).", END_MARK]
    return "\n".join(lines) + "\n"


def relative_paths(value):
    """``value`` with the repository's absolute path made relative in every string (no path of
    the benchmark machine goes into the repository)."""
    if isinstance(value, str):
        return value.replace(str(REPO) + os.sep, "").replace(str(REPO), ".")
    if isinstance(value, dict):
        return {key: relative_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [relative_paths(item) for item in value]
    return value


def append_run(report: dict, path: Path = RESULTS_JSON) -> dict:
    """Add this run to the results file (earlier runs kept); the whole file's contents."""
    history = json.loads(path.read_text()) if path.exists() else {"runs": []}
    history["runs"].append(relative_paths(json.loads(json.dumps(report, default=str))))
    write_json_atomic(path, history)
    return history


# Settings that make a run a lever run (one choice measured against the CLI defaults).
LEVER_SETTINGS = ("train_args", "pick_args", "masks_args")


def lever_of(run: dict) -> str:
    """What a run changed against the CLI defaults, as options ("" for a run at defaults)."""
    settings = run["settings"]
    changed = [
        f"--{key.replace('_', '-')} '{settings[key]}'"
        for key in LEVER_SETTINGS
        if settings.get(key)
    ]
    if settings.get("label_shape", "sphere") != "sphere":
        changed.append(f"--label-shape {settings['label_shape']}")
    if "models" in settings and not settings["models"]:
        changed.append("--models ''")  # DeepFinder alone, e.g. on draws the main run lacks
    return " ".join(changed)


def render(history: dict) -> str:
    """The family section: the latest full run at defaults (all tools), then each lever run
    beside that run's scores on the same draws."""
    runs = history.get("runs", [])
    full = [r for r in runs if not r["settings"].get("quick")]
    main = [r for r in full if not lever_of(r) and not r["settings"].get("no_deepfinder")]
    quick = [r for r in runs if r["settings"].get("quick")]
    levers = [r for r in full if lever_of(r)]
    return markdown_section(
        main[-1] if main else None,
        quick[-1] if quick else None,
        lever_lines(levers, main[-1] if main else None) if levers else (),
    )


def lever_lines(levers: list[dict], main: dict | None) -> list[str]:
    lines = [
        "### Lever runs",
        "",
        "One choice changed against the CLI defaults, on some of the draws; beside it, the run "
        "above on the same draws (same data, separate trainings: one run each, so a difference "
        "of a few hundredths may be noise).",
        "",
    ]
    for run in levers:
        seeds = [d["draw"]["seed"] for d in run["draws"]]
        lines += [
            f"#### `{lever_of(run)}`: run {run['finished']} UTC, draws "
            f"{', '.join(map(str, seeds))}"
            + (f", commit {commit}" if (commit := run["machine"].get("cryocaps_commit")) else ""),
            "",
            f"Command: `{run['command']}`",
            "",
            *summary_lines(run["summary"]),
            "",
        ]
        reference = {}
        for fraction, tools in run["summary"].items():
            # the main run's draws this lever ran at this fraction, and only those
            ran = {d["draw"]["seed"] for d in run["draws"] if fraction in d.get("fractions", {})}
            same = [d for d in (main or {}).get("draws", []) if d["draw"]["seed"] in ran]
            scored = summarize(same).get(fraction, {})
            if any(key in scored for key in tools):
                reference[fraction] = {k: v for k, v in scored.items() if k in tools}
        if reference:
            lines += [f"At defaults ({main['finished']} UTC), same draws:", ""]
            lines += [*summary_lines(reference), ""]
    return lines


# --------------------------------------------------------------------------- main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The family's options of ``vs_deepfinder.py``."""
    parser.add_argument(
        "--family",
        type=int,
        default=0,
        help="run the randomized family of this many draws (seeds --seed .. --seed+N-1) instead "
        "of the four sets [default: 0, the four sets]",
    )
    parser.add_argument(
        "--annotated-fraction",
        default="1",
        help="with --family: share of the training and validation particles annotated, per "
        "tomogram and class; a comma-separated list runs each [default: 1]",
    )
    parser.add_argument(
        "--family-shape",
        default=None,
        help="with --family: smallest tomogram shape Z,Y,X (grown across the beam until 150 test "
        "particles fit) [default: 64,160,160; 48,96,96 with --quick]",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --family: continue the run whose progress is in --work (partial_results.json, "
        "written after every tool): tools it finished are kept, the rest run; the settings must "
        "be the same, except that --annotated-fraction may add fractions",
    )
    parser.add_argument(
        "--redo",
        default="",
        help="with --resume: tools to run again although the run finished them (e.g. after a fix "
        "to picking; with --reuse-training their models are kept), comma-separated keys such as "
        "cryocaps-unet,deepfinder",
    )
    parser.add_argument(
        "--record-partial",
        action="store_true",
        help="with --family: add the unfinished run in --work to the results as it stands "
        "(marked partial, its finished draws only) and rewrite RESULTS.md; runs nothing",
    )
    parser.add_argument(
        "--masks-args",
        default="",
        help="with --family: extra options for `cryocaps make-masks`, one quoted string",
    )


def check_arguments(args, parser) -> None:
    if args.family < 0:
        parser.error(f"--family must be >= 0, got {args.family}")
    try:
        fractions = [float(f) for f in args.annotated_fraction.split(",") if f.strip()]
    except ValueError:
        parser.error(f"--annotated-fraction {args.annotated_fraction!r}: numbers in (0, 1]")
    if not fractions or not all(0 < f <= 1 for f in fractions):
        parser.error(f"--annotated-fraction {args.annotated_fraction!r}: numbers in (0, 1]")
    # the fully annotated run first: the others are reported as a ratio to it
    args.annotated_fraction = sorted(set(fractions), reverse=True)
    shape = args.family_shape or ("48,96,96" if args.quick else "64,160,160")
    try:
        args.family_shape = tuple(int(n) for n in shape.split(","))
    except ValueError:
        parser.error(f"--family-shape {shape!r}: three integers Z,Y,X")
    if len(args.family_shape) != 3:
        parser.error(f"--family-shape {shape!r}: three integers Z,Y,X")
    args.redo = [t.strip() for t in args.redo.split(",") if t.strip()]
    models = args.models.split(",") if isinstance(args.models, str) else args.models
    tools = ["deepfinder", *(f"cryocaps-{m.strip()}" for m in models)]
    if args.redo and not args.resume:
        parser.error("--redo needs --resume (a run without it runs every tool)")
    if any(t not in tools for t in args.redo):
        parser.error(f"--redo {','.join(args.redo)}: tools are {','.join(tools)}")


def run_draw(
    draw: dict, args, folder: Path, entry: dict, save, earlier: dict | None = None
) -> None:
    """Simulate one draw and run every tool at every annotated fraction, filling ``entry``.

    ``earlier``: this draw's entry in an interrupted run (``--resume``); the tools it finished
    are kept as they are, not run again.
    """
    from cryocaps.errors import CryocapsError
    from cryocaps.io.class_table import read_classes
    from cryocaps.io.particles import read_particles

    data = simulate_draw(draw, args, folder / "data")
    classes = read_classes(data["classes_csv"])
    truth = read_particles([data["particles"]], classes=classes)
    data["truth"] = truth
    test = truth[truth["tomo"].isin(data["names"]["test"])]
    entry |= {
        "draw": data["draw"],
        "classes": classes.to_records(),
        "simulate_seconds": data["simulate"].get("seconds"),
        "not_placed": {n: t["n_not_placed"] for n, t in data["simulate"]["tomograms"].items()},
        "n_test_particles": len(test),
        "test_particles_per_class": test["class_name"].value_counts().to_dict(),
        "fractions": {},
    }
    if len(test) < MIN_TEST_PARTICLES:
        say(f"draw {draw['seed']}: only {len(test)} test particles (< {MIN_TEST_PARTICLES})")
    save()
    for fraction in args.annotated_fraction:
        key = fraction_key(fraction)
        where = folder / f"annotated_{key}"
        annotations = make_annotations(data, fraction, args, where)
        tools = {}
        entry["fractions"][key] = {
            "n_annotated": annotations["n_annotated"],
            "n_particles": annotations["n_particles"],
            "tools": tools,
        }
        runs = [] if args.no_deepfinder else [("deepfinder", None)]
        runs += [(f"cryocaps-{m}", m) for m in args.models]
        kept = finished_tools(earlier, key, redo=args.redo)
        for key_tool, model in runs:
            if key_tool in kept:
                tools.update(kept[key_tool])
                say(
                    f"draw {draw['seed']} annotated {key} {key_tool}: kept from the interrupted run"
                )
                continue
            try:
                if model is None:
                    tools |= run_deepfinder_tool(
                        data, annotations, args, where / "deepfinder", classes, truth
                    )
                else:
                    tools |= run_cryocaps_tool(
                        model, data, annotations, args, where / key_tool, classes, truth
                    )
                done = tools[key_tool]
                say(
                    f"draw {draw['seed']} annotated {key} {key_tool}: macro F1 "
                    f"{fmt(done['macro_f1'])}, worst {fmt(done['worst_class_f1'])}"
                )
            except (RuntimeError, OSError, ValueError, KeyError, CryocapsError) as error:
                # one tool failing must not throw away the others' hours
                label = "DeepFinder 0.2.1" if model is None else f"cryocaps {model}"
                tools[key_tool] = {"tool": label, "error": str(error)}
                say(f"draw {draw['seed']} annotated {key} {key_tool}: FAILED: {error}")
            save()


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


# Options that change nothing a run measures: a resumed run may differ in them.
# The number of draws is one of them: draws are independent, each made from its own seed; a
# resumed run with fewer draws keeps the earlier run's other draws as they are (so that
# `--family 2 --resume --redo TOOL` runs a tool again on the first two draws only).
RUN_NEUTRAL = (
    "reuse_data", "reuse_training", "resume", "redo", "record_partial", "no_write", "render",
    "family",
)  # fmt: skip


def finished_tools(earlier: dict | None, fraction: str, redo=()) -> dict:
    """Tool key -> the result entries to keep, of the tools ``earlier`` finished at ``fraction``
    without an error and not named in ``redo`` (DeepFinder's run gives two entries: raw and
    tuned picks)."""
    if not earlier or "error" in earlier:
        return {}
    tools = earlier.get("fractions", {}).get(fraction, {}).get("tools", {})
    kept = {k: {k: e} for k, e in tools.items() if "error" not in e and ":" not in k}
    if "deepfinder" in kept and "deepfinder-tuned" in kept:
        kept["deepfinder"]["deepfinder-tuned"] = kept.pop("deepfinder-tuned")["deepfinder-tuned"]
    else:
        kept.pop("deepfinder", None)
    kept.pop("deepfinder-tuned", None)
    for k, e in tools.items():  # picking levers on a tool's maps go with the tool
        if ":" in k and k.split(":")[0] in kept:
            kept[k.split(":")[0]][k] = e
    return {k: v for k, v in kept.items() if k not in redo}


def draw_finished(entry: dict, args) -> bool:
    """Every fraction of ``args`` has a result (or an error) for every tool."""
    if "error" in entry:
        return True
    expected = ([] if args.no_deepfinder else ["deepfinder", "deepfinder-tuned"]) + [
        f"cryocaps-{m}" for m in args.models
    ]
    fractions = entry.get("fractions", {})
    return all(
        set(expected) <= set(fractions.get(fraction_key(f), {}).get("tools", {}))
        for f in args.annotated_fraction
    )


def load_partial(path: Path, settings: dict) -> dict:
    """The interrupted run in ``path``, checked to have been run with these settings."""
    if not path.exists():
        raise SystemExit(f"no unfinished family run to continue: {path} does not exist")
    report = json.loads(path.read_text())
    now = json.loads(json.dumps(settings, default=str))
    differ = sorted(
        k
        for k in (set(now) | set(report["settings"])) - {*RUN_NEUTRAL, "annotated_fraction"}
        if now.get(k) != report["settings"].get(k)
    )
    fractions_then = report["settings"].get("annotated_fraction") or [1.0]
    if not set(fractions_then) <= set(now.get("annotated_fraction") or [1.0]):
        differ.append("annotated_fraction: a resumed run may add fractions, not drop them")
    if differ:
        raise SystemExit(
            f"{path} was run with other settings ({', '.join(differ)}); run the same command "
            "again, or start afresh without --resume"
        )
    report["settings"]["annotated_fraction"] = now.get("annotated_fraction", fractions_then)
    return report


def record_partial(args, settings: dict) -> int:
    """``--record-partial``: the interrupted run's finished draws, into the results."""
    report = load_partial(args.work / "partial_results.json", settings)
    finished = [d for d in report["draws"] if draw_finished(d, args)]
    if not finished:
        raise SystemExit(f"the run in {args.work} has not finished a draw yet: nothing to record")
    report |= {
        "partial": True,
        "draws_planned": args.family,
        "draws": finished,
        "summary": summarize(finished),
        "finished": utc_now(),
        "total_seconds": report.get("elapsed_seconds"),
    }
    history = append_run(report, RESULTS_JSON)
    replace_section(RESULTS_MD, render(history), START_MARK, END_MARK)
    say(f"recorded {len(finished)} of {args.family} draws as a partial run in {RESULTS_JSON}")
    return 0


def run_family(args) -> int:
    """``vs_deepfinder.py --family N``: every draw, every fraction, every tool; the report."""
    import vs_deepfinder as vs
    from _bench import machine_info

    from cryocaps.errors import CryocapsError

    if args.render:
        history = json.loads(args.render.read_text())
        replace_section(RESULTS_MD, render(history), START_MARK, END_MARK)
        say(f"rewrote the family section of {RESULTS_MD} from {args.render}")
        return 0
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.quick and args.family > 1:
        say("--quick: one draw")
        args.family = 1
    started = time.time()
    report = {
        "command": shlex.join(["benchmarks/vs_deepfinder.py", *args.argv]),
        "started": utc_now(),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("argv", "previous_report")
        }
        | {"structures": structures_label(args.structures)},
        "deepfinder_versions": {},
    }
    partial = work / "partial_results.json"
    if args.record_partial:
        return record_partial(args, report["settings"])
    earlier = load_partial(partial, report["settings"]) if args.resume else {}
    before = earlier.get("elapsed_seconds", 0.0)
    if earlier:
        report["started"] = earlier["started"]
        report["resumed"] = [*earlier.get("resumed", []), utc_now()]
    earlier_draws = {d["draw"]["seed"]: d for d in earlier.get("draws", [])}
    if not args.no_deepfinder:
        report["deepfinder_versions"] = vs.ensure_deepfinder_venv(work)
        say(f"DeepFinder venv ready: {report['deepfinder_versions']}")
    report["machine"] = machine_info()
    report["conv3d_probe"] = {"start": vs.conv3d_probe()}
    in_range = range(args.seed, args.seed + args.family)
    report["draws"] = [d for s, d in earlier_draws.items() if s not in in_range]  # kept as they are

    def save() -> None:
        report["elapsed_seconds"] = before + time.time() - started
        partial.write_text(json.dumps(report, indent=2, default=str) + "\n")

    for seed in in_range:
        draw = draw_set(seed, args.structures)
        entry = {"draw": draw}
        report["draws"].append(entry)
        try:
            run_draw(draw, args, work / f"draw_{seed}", entry, save, earlier_draws.get(seed))
        except (RuntimeError, OSError, ValueError, KeyError, CryocapsError) as error:
            entry["error"] = str(error)
            say(f"draw {seed}: FAILED: {error}")
        report["summary"] = summarize(report["draws"])
        save()

    report["draws"].sort(key=lambda d: d["draw"]["seed"])
    report["conv3d_probe"]["end"] = vs.conv3d_probe()
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["finished"] = utc_now()
    report["total_seconds"] = before + time.time() - started
    report["summary"] = summarize(report["draws"])
    (work / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.no_write:  # this run's tables, quick or not
        print(markdown_section(relative_paths(json.loads(json.dumps(report, default=str))), None))
        return 0
    history = append_run(report)
    replace_section(RESULTS_MD, render(history), START_MARK, END_MARK)
    say(f"appended the run to {RESULTS_JSON} and rewrote the family section of {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit("run it as: python benchmarks/vs_deepfinder.py --family N [options]")
