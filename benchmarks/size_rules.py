"""Size rules for picks at defaults, scored on good label maps and on runaway ones.

Every variant below picks the same label map with the components method and is scored against
the truth (``cryocaps.evaluation.evaluate_picks``, no score thresholds: what a user without a
validation tomogram gets). Label maps only, as ``cryocaps cluster-picks`` sees them after
``segment`` without ``--probabilities``, so nothing is segmented again. Three kinds of map:

- ``--vs-deepfinder WORK``: the ``<set>/cryocaps-<model>/segment/{valid,test}/*_labels.mrc``
  maps a ``vs_deepfinder.py --work`` run left, truth from its ``particles.csv``;
- ``--segmented SEG_DIR:DATA_DIR``: ``SEG_DIR/<tomo>_labels.mrc`` maps that ``cryocaps segment``
  wrote for tomograms of the ``cryocaps simulate`` folder DATA_DIR (e.g. those that
  ``picking_levers.py`` leaves in ``<work>/<set>/seg_<model>``);
- ``--simulated DATA_DIR``: the truth label maps of a ``cryocaps simulate`` folder
  (``labels/<tomo>.mrc``; the maps a perfect network would make), as they are, grown by a
  voxel with a false fragment of 0.3-0.8 V per particle (a network right about every
  particle, with larger masks and fragments: where the relative limit pays), and with
  blobs of one class painted over the background (``--runaway``: 10, 20 and 30% of the
  volume; smoothed noise at the class's radius, thresholded; blobs that touch a particle
  of that class merge with it): the map a network makes when it calls background a faint
  class, where the particle-sized true picks must survive.

    python benchmarks/size_rules.py --simulated work/picking_levers/procedural/data \\
        --segmented work/picking_levers/procedural/seg_unet:work/picking_levers/procedural/data \\
        --json results/size_rules_runaway.json

Variants (V = the class's label volume, classes.csv's ``label_volume_angstrom3``): the fixed
limit alone (0.2 V), the relative limit as it was until 2026-12-07 (0.5 of the 90th
percentile of all of the class's pick sizes, blobs included; picked here with today's
splitting), upper bounds of 2, 3 and 4 V alone and with the relative limit taken from the
picks within the bounds, uncapped or capped at 0.5, 0.75 or 1 V (the default since
2026-12-07: 0.2 V, at most 3 V, relative 0.5 capped at 0.75 V).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cryocaps.evaluation import evaluate_picks
from cryocaps.io.class_table import read_classes
from cryocaps.io.volumes import read_tomogram
from cryocaps.masks import draw_spheres
from cryocaps.picking import pick_particles

NO_UPPER = 1e6  # an upper bound no component reaches
NO_CAP = 1e6  # a cap the relative limit never reaches
DEFAULT = "0.2 V + min(0.5 x p90 in [0.2, 3] V, 0.75 V), max 3 V (default)"
VARIANTS = {
    "0.2 V alone": {"relative_min_size": 0.0, "max_size_factor": NO_UPPER},
    "0.2 V + 0.5 x p90 of all picks (before)": {
        "max_size_factor": NO_UPPER,
        "relative_cap": NO_CAP,
    },
    "0.2 V, max 2 V": {"relative_min_size": 0.0, "max_size_factor": 2.0},
    "0.2 V, max 3 V": {"relative_min_size": 0.0, "max_size_factor": 3.0},
    "0.2 V, max 4 V": {"relative_min_size": 0.0, "max_size_factor": 4.0},
    "0.2 V + 0.5 x p90 in [0.2, 2] V, max 2 V": {"max_size_factor": 2.0, "relative_cap": NO_CAP},
    "0.2 V + 0.5 x p90 in [0.2, 3] V, max 3 V": {"max_size_factor": 3.0, "relative_cap": NO_CAP},
    "0.2 V + 0.5 x p90 in [0.2, 4] V, max 4 V": {"max_size_factor": 4.0, "relative_cap": NO_CAP},
    "0.2 V + min(0.5 x p90 in [0.2, 3] V, 0.5 V), max 3 V": {"relative_cap": 0.5},
    DEFAULT: {},
    "0.2 V + min(0.5 x p90 in [0.2, 3] V, 1 V), max 3 V": {"relative_cap": 1.0},
    "0.2 V + min(0.5 x p90 in [0.2, 4] V, 0.75 V), max 4 V": {"max_size_factor": 4.0},
}
RUNAWAY_FRACTIONS = (0.1, 0.2, 0.3)


def score_variants(label_map, truth, classes, voxel_size: float, tomo: str) -> dict:
    """{variant: evaluate_picks scores} for one label map."""
    results = {}
    for name, options in VARIANTS.items():
        picks = pick_particles(label_map, classes, voxel_size, tomo_name=tomo, **options)
        results[name] = evaluate_picks(picks, truth, classes, voxel_size, tomograms=[tomo])
    return results


def with_runaway_class(label_map, label: int, fraction: float, radius_voxels: float, seed: int):
    """``label_map`` with blobs of ``label`` painted over ``fraction`` of the volume (background
    voxels only): smoothed noise (sigma = the class radius) above a threshold."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(
        rng.standard_normal(label_map.shape).astype(np.float32), radius_voxels
    )
    background = label_map == 0
    wanted = min(fraction * label_map.size, background.sum())
    threshold = np.quantile(noise[background], 1 - wanted / background.sum())
    painted = label_map.copy()
    painted[background & (noise > threshold)] = label
    return painted


def with_fragments(label_map, classes, voxel: float, seed: int):
    """What a network that found every particle may still make of them: masks one voxel
    larger all round (1.3-1.8 label volumes for these radii) and, for every particle, a false
    fragment of its class (a ball of 0.3-0.8 label volumes) somewhere in the background."""
    rng = np.random.default_rng(seed)
    grown = ndimage.grey_dilation(label_map, footprint=ndimage.generate_binary_structure(3, 1))
    label_map = np.where(label_map > 0, label_map, grown)
    counts = np.bincount(label_map.ravel(), minlength=classes.n_labels)
    for particle_class in classes:
        volume = particle_class.label_volume_voxels(voxel)
        n = max(1, int(round(counts[particle_class.label] / (1.5 * volume))))
        radii = (rng.uniform(0.3, 0.8, n) * volume * 3 / (4 * np.pi)) ** (1 / 3)
        centres = rng.uniform(0, 1, (n, 3)) * np.array(label_map.shape)
        balls = draw_spheres(label_map.shape, centres, [particle_class.label] * n, radii)
        label_map = np.where((label_map == 0) & (balls > 0), balls, label_map)
    return label_map.astype(np.uint8)


def simulated_maps(data: Path, runaway: bool, tomograms: list[str] | None):
    """(key, label map, truth, classes, voxel size, tomo) for a simulate folder's truth maps."""
    classes = read_classes(data / "classes.csv")
    truth = pd.read_csv(data / "particles.csv")
    for label_path in sorted((data / "labels").glob("*.mrc")):
        tomo = label_path.stem
        if tomograms and tomo not in tomograms:
            continue
        label_file = read_tomogram(label_path)
        label_map = np.asarray(label_file.data).view(np.uint8)
        voxel = label_file.voxel_size_angstrom
        yield f"{data.parent.name}/truth/{tomo}", label_map, truth, classes, voxel, tomo
        fragments = with_fragments(label_map, classes, voxel, seed=len(tomo))
        yield f"{data.parent.name}/grown + fragments/{tomo}", fragments, truth, classes, voxel, tomo
        if not runaway:
            continue
        for particle_class in classes:
            for fraction in RUNAWAY_FRACTIONS:
                painted = with_runaway_class(
                    label_map, particle_class.label, fraction,
                    particle_class.radius_voxels(voxel), seed=particle_class.label,
                )  # fmt: skip
                key = f"{data.parent.name}/runaway {particle_class.name} {fraction:.0%}/{tomo}"
                yield key, painted, truth, classes, voxel, tomo


def segmented_maps(spec: str):
    """Maps ``cryocaps segment`` wrote (SEG_DIR:DATA_DIR), with the simulate folder's truth."""
    seg_dir, data = (Path(p) for p in spec.split(":", 1))
    classes = read_classes(data / "classes.csv")
    truth = pd.read_csv(data / "particles.csv")
    for label_path in sorted(seg_dir.glob("*_labels.mrc")):
        tomo, label_map, voxel = _segmented(label_path)
        yield f"{data.parent.name}/{seg_dir.name}/{tomo}", label_map, truth, classes, voxel, tomo


def vs_deepfinder_maps(work: Path):
    """Maps of every cryocaps model a vs_deepfinder.py run left."""
    for set_folder in sorted(p for p in work.iterdir() if (p / "data" / "particles.csv").is_file()):
        classes = read_classes(set_folder / "data" / "classes.csv")
        truth = pd.read_csv(set_folder / "data" / "particles.csv")
        for label_path in sorted(set_folder.glob("cryocaps-*/segment/*/*_labels.mrc")):
            tomo, label_map, voxel = _segmented(label_path)
            key = f"{work.name}/{set_folder.name}/{label_path.parts[-4]}/{tomo}"
            yield key, label_map, truth, classes, voxel, tomo


def _segmented(label_path: Path) -> tuple[str, np.ndarray, float]:
    """Tomogram name, labels (uint8) and voxel size of a ``<tomo>_labels.mrc`` segment wrote."""
    label_file = read_tomogram(label_path)
    tomo = label_path.name.removesuffix("_labels.mrc")
    return tomo, np.asarray(label_file.data).view(np.uint8), label_file.voxel_size_angstrom


def runaway_class(key: str) -> str | None:
    part = key.split("/")[1]
    return part.split()[1] if part.startswith("runaway ") else None


def table(results: dict) -> str:
    """Macro F1 per map and variant; for runaway maps also the runaway class's recall and
    precision (R / P)."""
    names = list(next(iter(results.values())))
    lines = ["| map | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, scores in results.items():
        blob = runaway_class(key)
        cells = []
        for name in names:
            cell = f"{scores[name]['macro']['f1']:.2f}"
            if blob:
                entry = scores[name]["classes"][blob]
                cell += f" ({entry['recall']:.2f} / {entry['precision']:.2f})"
            cells.append(cell)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for kind, keep in (("good maps", False), ("runaway maps", True)):
        chosen = [s for k, s in results.items() if bool(runaway_class(k)) == keep]
        if chosen:
            means = [np.mean([s[n]["macro"]["f1"] for s in chosen]) for n in names]
            lines.append(f"| mean, {kind} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs-deepfinder", type=Path, nargs="*", default=[], metavar="WORK")
    parser.add_argument("--segmented", nargs="*", default=[], metavar="SEG_DIR:DATA_DIR")
    parser.add_argument("--simulated", type=Path, nargs="*", default=[], metavar="DATA_DIR")
    parser.add_argument("--tomograms", default="tomo_04,tomo_05", help="of --simulated folders")
    parser.add_argument(
        "--no-runaway", action="store_true", help="--simulated maps as they are only"
    )
    parser.add_argument("--json", type=Path, default=None, help="append per-class scores here")
    parser.add_argument("--note", default="", help="recorded with the run in --json")
    args = parser.parse_args(argv)
    sources = [m for work in args.vs_deepfinder for m in vs_deepfinder_maps(work)]
    sources = [*sources, *(m for spec in args.segmented for m in segmented_maps(spec))]
    tomograms = args.tomograms.split(",") if args.tomograms else None
    results = {}
    for maps in [
        sources,
        *(simulated_maps(d, not args.no_runaway, tomograms) for d in args.simulated),
    ]:
        for key, label_map, truth, classes, voxel, tomo in maps:
            results[key] = score_variants(label_map, truth, classes, voxel, tomo)
            print(key, {n: round(s["macro"]["f1"], 3) for n, s in results[key].items()}, flush=True)
    if not results:
        raise SystemExit("no label maps: give --vs-deepfinder, --segmented or --simulated")
    print(table(results))
    if args.json:
        from _bench import utc_now, write_json_atomic

        history = json.loads(args.json.read_text()) if args.json.is_file() else []
        history = history if isinstance(history, list) else [{"maps": history}]
        history.append({"date": utc_now(), "note": args.note, "maps": results})
        write_json_atomic(args.json, history)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
