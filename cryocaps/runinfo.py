"""``run.json``: what ran, with what, on what, and how long it took."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from cryocaps import __version__
from cryocaps.io.files import write_text_atomic


def _file_entry(path) -> dict:
    path = Path(path)
    entry = {"path": str(path)}
    if path.is_file():
        entry["bytes"] = path.stat().st_size
    return entry


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    On Linux this is ``VmHWM`` from /proc/self/status: ``ru_maxrss`` survives
    ``exec``, so a command started from a large process would report the
    parent's peak.
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def environment() -> dict:
    info = {
        "cryocaps": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["cuda"] = bool(torch.cuda.is_available())
        info["torch_threads"] = torch.get_num_threads()
    native = sys.modules.get("cryocaps.models.native")
    routing = None if native is None else native.status()
    if routing is not None:  # capsule layers routed on the CPU: say how
        info["capsule_routing_cpu"] = routing
    return info


def write_run_json(
    out_dir,
    *,
    command: str,
    inputs: list | None = None,
    outputs: list | None = None,
    parameters: dict | None = None,
    seed: int | None = None,
    timings: dict | None = None,
    results: dict | None = None,
    started: float | None = None,
    name: str = "run.json",
) -> Path:
    """Write ``OUT_DIR/run.json`` (atomically, replacing an older one)."""
    record = {
        "command": command,
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started or time.time())),
        "environment": environment(),
        "seed": seed,
        "parameters": parameters or {},
        "inputs": [_file_entry(p) for p in (inputs or [])],
        "outputs": [str(p) for p in (outputs or [])],
        "timings_seconds": timings or {},
        "peak_rss_bytes": peak_rss_bytes(),
        "results": results or {},
    }
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n", overwrite=True)
    return path
