"""Peak memory of segmentation as the tomogram grows: does it stay bounded?

    python benchmarks/memory_segment.py [--shapes 32,96,96:128,384,384]
                                        [--patch-size 48 --overlap 16] [--probabilities]
                                        [--threads 2] [--input-format mrc|zarr]

Segments each shape (a memory-mapped float32 MRC of noise) in a fresh
subprocess with ``segment_tomogram`` and a small U-Net (widths 16/16/16, 4
classes: the number of classes sets the blending buffers, the widths only
the constant per-window cost), and reads the subprocess's peak RSS. The
default window (48^3, overlap 16) is chosen so that both default shapes are
cut into windows of exactly the same size: the difference in peak RSS is then
what the tomogram itself costs. Growth is reported in bytes per voxel of the
larger minus the smaller volume, beside the size of the output maps.

Measured 2026-11-25 (2 shared CPUs, --bf16): 32x96x96 peak 337.0 MiB,
128x384x384 peak 367.7 MiB: growth 1.73 B/voxel in all (written output pages
are dropped after each slab, so the 1 B/voxel label map is not resident).
The remaining growth is the float16 Z-overlap buffer (K x overlap x Y x X)
and one window row of input.

Measured 2026-12-02 with --shapes 64,256,256:256,256,256 --threads 1: MRC input
614.5 -> 621.1 MiB (0.55 B/voxel), OME-Zarr input (--input-format zarr)
626.5 -> 636.7 MiB (0.85 B/voxel): flat in depth with either.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
import numpy as np, torch
from cryocaps.modelfile import load_model
from cryocaps.inference import segment_tomogram
from cryocaps.runinfo import peak_rss_bytes  # VmHWM: this process only, not its parent
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
model, config = load_model(args["model"])
before = peak_rss_bytes()
result = segment_tomogram(model, config, args["tomogram"], args["out"],
                          patch_size=args["patch_size"], overlap=args["overlap"],
                          probabilities=args["probabilities"], score=args["score"],
                          bf16=args["bf16"])
result["rss_before_bytes"] = before
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", default="32,96,96:128,384,384", help="z,y,x shapes separated by ':'"
    )
    parser.add_argument("--patch-size", type=int, default=48)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument(
        "--probabilities", action="store_true", help="also write the probability stack"
    )
    parser.add_argument("--score", action="store_true", help="also write the score map")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (faster; same buffers)"
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--input-format",
        choices=("mrc", "zarr"),
        default="mrc",
        help="tomogram as a memory-mapped MRC or an OME-Zarr image (64^3 chunks, read lazily)",
    )
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(":")]

    import numpy as np

    from cryocaps.io.volumes import MrcVolumeWriter
    from cryocaps.io.zarr_volumes import ZarrVolumeWriter
    from cryocaps.modelfile import save_model
    from cryocaps.models import create_model

    n_classes = 4
    rows = []
    with tempfile.TemporaryDirectory(prefix="cryocaps-mem-") as tmp:
        tmp = Path(tmp)
        model = create_model("unet", n_classes, widths=(16, 16, 16))
        classes = [
            {"label": n, "name": f"c{n}", "radius_angstrom": 50.0} for n in range(1, n_classes)
        ]
        save_model(
            tmp / "model",
            model,
            {
                "classes": classes,
                "voxel_size_angstrom": 10.0,
                "patch_size": 48,
                "normalization": {"method": "percentile_zscore"},
            },
        )
        for shape in shapes:
            tomogram = tmp / f"tomo_{'x'.join(map(str, shape))}.{args.input_format}"
            rng = np.random.default_rng(0)
            volume_writer = ZarrVolumeWriter if args.input_format == "zarr" else MrcVolumeWriter
            with volume_writer(
                tomogram, shape, 10.0, dtype="float32"
            ) as writer:  # never whole in memory
                for z in range(0, shape[0], 16):  # slabs: a Zarr chunk row is encoded once
                    slab = rng.normal(size=(min(16, shape[0] - z), *shape[1:])).astype(np.float32)
                    writer.data[z : z + len(slab)] = slab
            child_args = {
                "model": str(tmp / "model"),
                "tomogram": str(tomogram),
                "out": str(tmp / f"out_{tomogram.stem}"),
                "patch_size": args.patch_size,
                "overlap": args.overlap,
                "threads": args.threads,
                "probabilities": args.probabilities,
                "score": args.score,
                "bf16": args.bf16,
            }
            completed = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(child_args)],
                capture_output=True,
                text=True,
            )
            if completed.returncode:
                raise SystemExit(completed.stderr)
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            voxels = math.prod(shape)
            output_bytes = voxels * (1 + 2 * n_classes * args.probabilities + 2 * args.score)
            row = {
                "input_format": args.input_format,
                "shape": list(shape),
                "voxels": voxels,
                "patch_size": result["patch_size"],
                "windows": result["windows"],
                "seconds": result["seconds"]["total"],
                "rss_after_model_load_mib": round(result["rss_before_bytes"] / 2**20, 1),
                "peak_rss_mib": round(result["peak_rss_bytes"] / 2**20, 1),
                "output_mib": round(output_bytes / 2**20, 1),
                "input_mib": round(voxels * 4 / 2**20, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    small, large = rows[0], rows[-1]
    extra_voxels = large["voxels"] - small["voxels"]
    growth = (large["peak_rss_mib"] - small["peak_rss_mib"]) * 2**20 / extra_voxels
    outputs = (large["output_mib"] - small["output_mib"]) * 2**20 / extra_voxels
    print(
        f"peak RSS growth {growth:.2f} B/voxel "
        f"({small['peak_rss_mib']} -> {large['peak_rss_mib']} MiB); "
        f"output maps {outputs:.2f} B/voxel; "
        f"growth beyond the outputs {growth - outputs:.2f} B/voxel "
        f"(window {large['patch_size']}, overlap {args.overlap}, {n_classes} classes)"
    )


if __name__ == "__main__":
    main()
