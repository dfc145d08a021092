"""Time one SHREC-sized simulated tomogram: 200 x 512 x 512 voxels at 10 Å.

    python benchmarks/simulate_speed.py [--shape 200,512,512] [--threads 2] [--structures DIR]

Prints the time of each stage (templates, render, tilt series, reconstruction),
the whole-tomogram wall and CPU time, the machine's load and the peak resident
memory, as one JSON line.
Target: under 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="200,512,512", help="Z,Y,X voxels [200,512,512]")
    parser.add_argument("--voxel-size-angstrom", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    parser.add_argument(
        "--structures", default=None, help="folder of maps/models [built-in classes]"
    )
    parser.add_argument("--crowding", type=float, default=0.1)
    args = parser.parse_args()

    import numpy as np
    import torch

    from cryocaps.runinfo import peak_rss_bytes
    from cryocaps.simulate import SimulationParameters, load_templates, simulate_tomogram

    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    started = time.perf_counter()
    templates = load_templates(args.voxel_size_angstrom, args.structures)
    template_seconds = time.perf_counter() - started
    params = SimulationParameters(
        shape=shape, voxel_size_angstrom=args.voxel_size_angstrom, crowding=args.crowding
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    result = simulate_tomogram(templates, params, np.random.default_rng(0))
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    record = {
        "shape_zyx": shape,
        "voxel_size_angstrom": args.voxel_size_angstrom,
        "threads": args.threads,
        "n_particles": result.details["n_particles"],
        "n_tilts": result.details["n_tilts"],
        "templates_seconds": round(template_seconds, 2),
        "stages_seconds": {k: round(v, 2) for k, v in result.details["timings_seconds"].items()},
        "tomogram_seconds": round(total, 2),
        "tomogram_cpu_seconds": round(cpu, 2),  # all threads; wall >> cpu / threads: a busy machine
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_gb": round(peak_rss_bytes() / 2**30, 2),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
