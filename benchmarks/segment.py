"""Speed of ``cryocaps segment`` on CPU, for both networks.

    python benchmarks/segment.py [--shape 64,160,160] [--models unet,ucaps]
                                 [--variants default,bf16] [--threads 2] [--json OUT.json]

For each model (freshly initialised at its paper size: speed does not depend
on the weights) and each variant, runs the whole ``cryocaps segment`` command
in a subprocess on one simulated tomogram (default 64 x 160 x 160, the size of
the benchmark sets' tomograms), and reports:

- wall time of the whole process (start-up, model load, normalisation,
  inference, writing);
- output voxels per second (from the command's run.json);
- useful FLOPs per output voxel: the network's FLOPs per window voxel
  (counted by torch's FlopCounterMode, a multiply-add = 2 FLOPs);
- the overlap overhead: voxels computed per output voxel (windows x window
  volume / volume, including the mirror margins);
- achieved GFLOP/s = useful FLOPs x overhead x voxels / inference seconds;
- the conv3d ceiling measured in the same run: a 32 -> 32 channel 3x3x3
  convolution on a 64^3 block, float32 and bfloat16, channels-last;
- peak RSS of the segment process.

``--agreement`` instead checks that the fast settings keep the answer: it
trains a small U-Net for a few hundred steps on a synthetic tomogram of dark
spheres (two sizes), then compares the label map of each setting (default
windows, bf16, the paper's 64^3 / 25, mean blending, no overlap) with a
reference computed in one window holding the whole volume plus 32-voxel
mirror margins (no window borders at all), and with the ground truth.

Variants: ``default`` (CLI defaults: bf16 on CPUs that have it natively),
``fp32`` (--no-bf16), ``bf16``, ``paper`` (64^3 windows, 25-voxel overlap,
float32, as the paper), ``paper-bf16``, ``batch2`` (two windows per pass).
Channels-last memory format is always on. The CPU of the machine the numbers were taken on
may be shared: the load average before and after is printed with them. DeepFinder is not
run here: ``vs_deepfinder.py`` times its Segment and ours on the same tomogram in one run
(its "segment wall" rows). ``--json`` adds the run to that file's list of runs.

Measured 2026-11-25 on the shared 2-CPU machine (load average ~5), 64x160x160,
windows 80x96x96 (4), overhead 1.8: conv3d ceiling 85.5 (float32) / 213.5
(bfloat16) GFLOP/s; unet default (bf16) 10.4 s wall, 145 GFLOP/s, 0.61 GiB;
unet float32 18.3 s; ucaps default (bf16) 54.4 s, 1255 kFLOP/voxel at 73 GFLOP/s,
1.28 GiB; ucaps float32 66.2 s, 2.0 GiB. A second run at load ~4 (ceiling 129 / 366
GFLOP/s): unet default 7.0 s at 211 GFLOP/s; ucaps default 48.6 s.
``--agreement`` (toy U-Net, Dice vs truth 0.93/0.96): default windows differ
from the border-free reference on 14 of 786k voxels, bf16 on 45, the paper's
64/25 on 210 (and take 5x longer), no overlap on 609 (Dice -0.008).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import append_run

VARIANTS = {
    "default": [],  # bf16 where the CPU has it natively
    "fp32": ["--no-bf16"],
    "bf16": ["--bf16"],
    "paper": ["--patch-size", "64", "--overlap", "25", "--no-bf16"],
    "paper-bf16": ["--patch-size", "64", "--overlap", "25", "--bf16"],
    "batch2": ["--batch-size", "2"],
}
CLASSES = [{"label": n, "name": f"class{n}", "radius_angstrom": 50.0} for n in (1, 2, 3)]


def conv3d_ceiling(threads: int) -> dict:
    """GFLOP/s of a dense 3x3x3 convolution (32 -> 32 channels, 64^3), fp32 and bf16,
    channels-last.
    """
    import torch

    torch.set_num_threads(threads)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval().to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 32, 64, 64, 64).contiguous(memory_format=torch.channels_last_3d)
    flops = 2 * 27 * 32 * 32 * 64**3
    result = {}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None),
        ):
            conv(x)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - start)
        result[name] = round(flops / min(times) / 1e9, 1)
    return result


def flops_per_voxel(model, patch) -> float:
    """Network FLOPs per window voxel at window side ``patch`` (z, y, x)."""
    import math

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, *patch)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / math.prod(patch)


def make_inputs(folder: Path, shape, models) -> tuple[Path, dict]:
    import numpy as np

    from cryocaps.io.volumes import write_volume
    from cryocaps.modelfile import save_model
    from cryocaps.models import create_model

    rng = np.random.default_rng(0)
    tomogram = folder / "tomo.mrc"
    write_volume(tomogram, rng.normal(size=shape).astype(np.float32), 10.0)
    model_dirs = {}
    for name in models:
        model = create_model(name, len(CLASSES) + 1)
        metadata = {
            "classes": CLASSES,
            "voxel_size_angstrom": 10.0,
            "patch_size": 64,
            "normalization": {"method": "percentile_zscore", "clip_percentiles": [0.5, 99.5]},
        }
        model_dirs[name] = save_model(folder / name, model, metadata)
    return tomogram, model_dirs


def run_segment(
    tomogram: Path, model_dir: Path, out_dir: Path, options: list[str], threads: int
) -> dict:
    command = [
        sys.executable,
        "-m",
        "cryocaps",
        "segment",
        str(tomogram),
        "--model",
        str(model_dir),
        "-o",
        str(out_dir),
        "--threads",
        str(threads),
        "--quiet",
        *options,
    ]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"segment failed: {' '.join(command)}\n{completed.stderr}")
    record = json.loads((out_dir / "run.json").read_text())
    result = record["results"]["tomograms"][0]
    return {
        "wall_seconds": round(wall, 2),
        "result": result,
        "peak_rss_bytes": record["results"]["peak_rss_bytes"],
    }


def synthetic_spheres(shape, seed=0):
    """Dark spheres of two sizes (radius 3 and 6 voxels) in smoothed noise, with their label map."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    zz, yy, xx = np.indices(shape, sparse=True)
    for label, radius, count in ((1, 3, 60), (2, 6, 20)):
        for _ in range(count):
            z, y, x = (rng.integers(radius, n - radius) for n in shape)
            inside = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
            labels[inside & (labels == 0)] = label
    volume = gaussian_filter(rng.normal(size=shape), 1.0) - 0.6 * (labels > 0)
    return volume.astype(np.float32), labels


def train_toy_unet(volume, labels, steps, threads, seed=0):
    """A small U-Net (widths 16/24/32) trained on random 32^3 patches: good enough to have
    opinions.
    """
    import numpy as np
    import torch

    from cryocaps.models import create_model
    from cryocaps.preprocess import normalize

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    model = create_model("unet", 3, widths=(16, 24, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    image = normalize(volume)
    for _ in range(steps):
        corners = [[rng.integers(0, n - 32 + 1) for n in volume.shape] for _ in range(4)]
        x = np.stack([image[z : z + 32, y : y + 32, w : w + 32] for z, y, w in corners])[:, None]
        t = np.stack([labels[z : z + 32, y : y + 32, w : w + 32] for z, y, w in corners]).astype(
            np.int64
        )
        loss, _ = model.compute_loss(torch.from_numpy(x), torch.from_numpy(t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def agreement(threads: int, steps: int) -> list[dict]:
    """Label maps of the fast settings against a border-free reference and the truth."""
    import numpy as np

    from cryocaps.inference import ProbabilityPredictor, normalization_transform, sliding_window

    shape = (48, 128, 128)
    volume, truth = synthetic_spheres(shape)
    model = train_toy_unet(volume, truth, steps, threads)
    config = {"normalization": {"method": "percentile_zscore"}}
    transform = normalization_transform(volume, config)
    predictor = ProbabilityPredictor(model)

    def labels(patch, overlap, **options):
        return sliding_window(
            volume, predictor, patch, overlap, size_multiple=4, transform=transform, **options
        ).argmax(0)

    margin = 32
    reference = labels(tuple(-(-(n + 2 * margin) // 4) * 4 for n in shape), 2 * margin)
    settings = {
        "default (96, overlap 16, gaussian)": dict(patch=96, overlap=16),
        "default + bf16": dict(patch=96, overlap=16, bf16=True),
        "paper (64, overlap 25)": dict(patch=64, overlap=25),
        "64, overlap 16": dict(patch=64, overlap=16),
        "96, overlap 16, mean blending": dict(patch=96, overlap=16, blending="mean"),
        "96, no overlap": dict(patch=96, overlap=0),
        "48, overlap 8": dict(patch=48, overlap=8),
    }

    def dice(a, b):
        scores = [
            2 * ((a == c) & (b == c)).sum() / max((a == c).sum() + (b == c).sum(), 1)
            for c in (1, 2)
        ]
        return [round(float(d), 4) for d in scores]

    rows = [
        {
            "setting": "reference (one window, 32-voxel margins)",
            "dice_vs_truth": dice(reference, truth),
        }
    ]
    for name, options in settings.items():
        start = time.perf_counter()
        result = labels(options.pop("patch"), options.pop("overlap"), **options)
        rows.append(
            {
                "setting": name,
                "seconds": round(time.perf_counter() - start, 2),
                "voxels_differing_from_reference": int((result != reference).sum()),
                "fraction_differing": float(np.mean(result != reference)),
                "dice_vs_reference": dice(result, reference),
                "dice_vs_truth": dice(result, truth),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64,160,160", help="tomogram shape z,y,x [64,160,160]")
    parser.add_argument("--models", default="unet,ucaps", help="models to time [unet,ucaps]")
    parser.add_argument(
        "--variants", default="default,fp32", help=f"of {','.join(VARIANTS)} [default,fp32]"
    )
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads [all]"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--agreement", action="store_true", help="check the settings' label maps instead"
    )
    parser.add_argument(
        "--train-steps", type=int, default=300, help="toy U-Net steps for --agreement [300]"
    )
    args = parser.parse_args()
    if args.agreement:
        rows = agreement(args.threads, args.train_steps)
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.json:
            append_run(args.json, {"agreement": rows})
        return
    shape = tuple(int(s) for s in args.shape.split(","))
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]

    import math

    from cryocaps.modelfile import load_model

    load_before = os.getloadavg()
    ceiling = conv3d_ceiling(args.threads)
    print(f"conv3d ceiling (32->32, 3^3, 64^3, channels-last): {ceiling} GFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cryocaps-bench-") as tmp:
        tomogram, model_dirs = make_inputs(Path(tmp), shape, models)
        for name in models:
            model, _ = load_model(model_dirs[name])
            for variant in variants:
                out_dir = Path(tmp) / f"out-{name}-{variant}"
                run = run_segment(
                    tomogram, model_dirs[name], out_dir, VARIANTS[variant], args.threads
                )
                result = run["result"]
                useful = flops_per_voxel(model, result["patch_size"])
                voxels = math.prod(shape)
                seconds = result["seconds"]["inference"]
                row = {
                    "model": name,
                    "variant": variant,
                    "shape": list(shape),
                    "patch_size": result["patch_size"],
                    "overlap": result["overlap"],
                    "windows": result["windows"],
                    "wall_seconds": run["wall_seconds"],
                    "inference_seconds": seconds,
                    "voxels_per_second": result["voxels_per_second"],
                    "useful_kflop_per_voxel": round(useful / 1e3, 1),
                    "overlap_overhead": result["overhead"],
                    "achieved_gflop_per_second": round(
                        useful * result["overhead"] * voxels / seconds / 1e9, 1
                    ),
                    "peak_rss_gib": round(run["peak_rss_bytes"] / 2**30, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "conv3d_ceiling_gflop_per_second": ceiling,
        "runs": rows,
    }
    print(
        f"load average before {summary['load_average_before']}, "
        f"after {summary['load_average_after']} "
        f"on {os.cpu_count()} CPUs (a shared machine slows every number here)"
    )
    header = "model  variant     wall s  Mvox/s  kFLOP/vox  overhead  GFLOP/s  peak GiB"
    print(header)
    for r in rows:
        print(
            f"{r['model']:6s} {r['variant']:10s} {r['wall_seconds']:7.1f} "
            f"{r['voxels_per_second'] / 1e6:7.3f} {r['useful_kflop_per_voxel']:10.0f} "
            f"{r['overlap_overhead']:9.2f} "
            f"{r['achieved_gflop_per_second']:8.1f} {r['peak_rss_gib']:9.2f}"
        )
    if args.json:
        append_run(args.json, summary)


if __name__ == "__main__":
    main()
