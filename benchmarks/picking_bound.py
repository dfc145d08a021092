"""Picking time and memory on label maps as wrong as a label map can be, at a CZII run's size.

Builds label maps of a 184 x 630 x 630 tomogram (10 Å voxels, the six CZII classes) that no
network should ever write, and times ``cryocaps cluster-picks`` on each as a user runs it
(the whole process: start-up, reading the map, picking, writing the STAR file): wall time,
CPU time and peak memory (``wait4``). Issue 28: a map where one class covered nearly every
voxel ran for over 8 minutes at 2.4 GiB; the goal is under a minute, well under 2.4 GiB, for
any map.

    python benchmarks/picking_bound.py                      # every map, results appended
    python benchmarks/picking_bound.py --maps random_labels,blobs_8 --shape 92,315,315

Maps (labels 0 = background, 1-6 the classes):
  one_class_everywhere   class 1 everywhere but for 300 particles of the other classes
  random_labels          every voxel a random label 0-6
  random_two             every voxel background or class 1, half and half
  checkerboard_1         (z + y + x) % 7: the seven labels in alternating voxels
  checkerboard_8/16      cubes of 8 or 16 voxels, labels cycling (class-sized blobs everywhere)
  blobs_4/8/16           every voxel the argmax of smoothed noise over the seven labels
                         (blobs of every class, sized by the smoothing in voxels)
  runaway_26             300 true particles plus blobs of one class over 26% of the map,
                         as the U-Net made of the faint barrel class in issue 28

Results: appended to benchmarks/results/picking_bound.json (one entry per run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import cryocaps_cmd, machine_info, run_measured, say, utc_now, write_json_atomic

from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.io.class_table import write_classes
from cryocaps.io.volumes import write_volume
from cryocaps.masks import draw_spheres

HERE = Path(__file__).resolve().parent
VOXEL = 10.0
SHAPE = (184, 630, 630)
# The six CZII challenge classes (radii in Å as the challenge gives them).
CLASSES = [
    ("apo-ferritin", 60.0),
    ("beta-amylase", 65.0),
    ("beta-galactosidase", 90.0),
    ("ribosome", 150.0),
    ("thyroglobulin", 130.0),
    ("virus-like-particle", 135.0),
]
N_LABELS = len(CLASSES) + 1


def class_table() -> ClassTable:
    return ClassTable([ParticleClass(i, n, r) for i, (n, r) in enumerate(CLASSES, 1)])


def particles(shape, rng, count: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (count, 3), labels and radii (voxels) of random particles of every class."""
    labels = rng.integers(1, N_LABELS, count)
    radii = np.array([CLASSES[label - 1][1] / VOXEL for label in labels])
    centres = rng.uniform(0, 1, (count, 3)) * np.array(shape)
    return centres, labels, radii


def smoothed_argmax(shape, rng, blob_voxels: int) -> np.ndarray:
    """Argmax over the labels of noise smoothed at a coarse grid, repeated up to ``shape``."""
    step = max(1, blob_voxels // 2)
    coarse = tuple(-(-n // step) for n in shape)
    noise = rng.standard_normal((N_LABELS, *coarse)).astype(np.float32)
    smooth = np.stack([ndimage.gaussian_filter(channel, 1.0) for channel in noise])
    labels = np.argmax(smooth, axis=0).astype(np.uint8)
    for axis in range(3):
        labels = np.repeat(labels, step, axis=axis)
    return np.ascontiguousarray(labels[: shape[0], : shape[1], : shape[2]])


def build(name: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    if name == "one_class_everywhere":
        centres, labels, radii = particles(shape, rng)
        labels[labels == 1] = 2
        label_map = draw_spheres(shape, centres, labels, radii)
        label_map[label_map == 0] = 1
        return label_map
    if name == "random_labels":
        return rng.integers(0, N_LABELS, shape, dtype=np.uint8)
    if name == "random_two":
        return rng.integers(0, 2, shape, dtype=np.uint8)
    if name.startswith("checkerboard_"):
        block = int(name.split("_")[1])
        return ((z // block + y // block + x // block) % N_LABELS).astype(np.uint8)
    if name.startswith("blobs_"):
        return smoothed_argmax(shape, rng, int(name.split("_")[1]))
    if name == "runaway_26":
        centres, labels, radii = particles(shape, rng)
        label_map = draw_spheres(shape, centres, labels, radii)
        blobs = smoothed_argmax(shape, rng, 12) == 1  # one label in seven: ~14% per draw
        blobs |= smoothed_argmax(shape, rng, 12) == 1
        label_map[blobs & (label_map == 0)] = 1
        return label_map
    raise SystemExit(f"unknown map {name!r}")


def write_map(name: str, shape, label_path: Path) -> None:
    """The map as uint8 MRC, and beside it (.json) each label's share of its voxels."""
    label_map = build(name, shape).astype(np.uint8)
    coverage = np.bincount(label_map.ravel(), minlength=N_LABELS) / label_map.size
    write_volume(label_path, label_map, VOXEL, dtype="uint8", overwrite=True)
    label_path.with_suffix(".json").write_text(json.dumps([round(float(c), 4) for c in coverage]))


MAPS = [
    "one_class_everywhere", "random_labels", "random_two", "checkerboard_1", "checkerboard_8",
    "checkerboard_16", "blobs_4", "blobs_8", "blobs_16", "runaway_26",
]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", default=",".join(MAPS))
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="Z,Y,X")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "picking_bound")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "picking_bound.json")
    parser.add_argument("--note", default="", help="recorded with the run")
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.build:
        write_map(args.build, shape, args.work / f"{args.build}_labels.mrc")
        return 0
    classes_csv = write_classes(class_table(), args.work / "classes.csv")
    machine = machine_info()  # the load average before the runs
    runs = {}
    for name in args.maps.split(","):
        label_path = args.work / f"{name}_labels.mrc"
        # built in a process of its own: a child forked from a parent holding the map would
        # count the parent's pages in its peak memory
        subprocess.run(
            [sys.executable, __file__, "--build", name, "--shape", args.shape,
             "--work", str(args.work)],
            check=True,
        )  # fmt: skip
        coverage = json.loads(label_path.with_suffix(".json").read_text())
        out = args.work / f"{name}_picks.star"
        cmd = cryocaps_cmd("cluster-picks", label_path, "--classes", classes_csv, "-o", out,
                           "--overwrite", "--quiet")  # fmt: skip
        measured = run_measured(cmd, args.work / f"{name}.log")
        run_json = json.loads((args.work / "run.json").read_text())
        runs[name] = measured | {
            "picks": run_json["results"]["picks"],
            "picking_seconds": run_json["timings_seconds"]["picking"],
            "coverage": coverage,
        }
        say(
            f"{name}: {measured['wall_seconds']:.1f} s wall, "
            f"{measured['cpu_seconds']:.1f} s CPU, "
            f"{measured['peak_rss_bytes'] / 2**30:.2f} GiB, {runs[name]['picks']} picks"
        )
        label_path.unlink()
        label_path.with_suffix(".json").unlink()
    history = json.loads(args.results.read_text()) if args.results.is_file() else []
    history.append({"date": utc_now(), "shape": list(shape), "note": args.note,
                    "machine": machine, "maps": runs})  # fmt: skip
    write_json_atomic(args.results, history)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
