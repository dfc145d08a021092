"""Small helpers shared by benchmark scripts: timed subprocesses, machine facts, results files.

Nothing here runs at import time; the scripts call these functions.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path


def say(message: str) -> None:
    """A time-stamped progress line on stdout."""
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def cryocaps_cmd(*args) -> list[str]:
    """``python -m cryocaps ARGS`` with the interpreter running this script."""
    return [sys.executable, "-m", "cryocaps", *[str(a) for a in args]]


def train_cmd(
    tomograms,
    labels,
    classes_csv,
    run_dir,
    model: str,
    minutes: float,
    seed: int,
    *extra,
    val_tomogram=None,
) -> list[str]:
    """``cryocaps train`` on these tomograms/label maps for ``minutes`` of wall time (+ ``extra``
    options).
    """
    val = ["--val-tomograms", val_tomogram] if val_tomogram else []
    return cryocaps_cmd(
        "train", *repeat("--tomograms", tomograms), *repeat("--labels", labels), *val,
        "--classes", classes_csv, "-o", run_dir, "--model", model,
        "--max-minutes", minutes, "--seed", seed, *extra,
    )  # fmt: skip


def repeat(flag: str, values) -> list[str]:
    """``--flag a --flag b``: how cryocaps takes several values for one option."""
    return [item for value in values for item in (flag, str(value))]


def run_measured(
    cmd: list[str], log_path: Path, *, stdout_path: Path | None = None, env: dict | None = None
) -> dict:
    """Run ``cmd`` to completion; its wall time, CPU time and own peak RSS (``wait4``).

    stdout and stderr go to ``log_path`` (after a ``$ command`` line), or stdout alone
    to ``stdout_path`` when given. A non-zero exit raises RuntimeError with the log's tail.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        out = open(stdout_path, "w") if stdout_path else log
        try:
            process = subprocess.Popen(
                cmd, stdout=out, stderr=log if stdout_path else subprocess.STDOUT, env=env
            )
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            if stdout_path:
                out.close()
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code  # already reaped by wait4
    if code != 0:
        tail = log_path.read_text().splitlines()[-12:]
        raise RuntimeError(
            f"exit {code}: {shlex.join(cmd)}\n  see {log_path}\n  " + "\n  ".join(tail)
        )
    return {
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": int(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)),
        "exit_code": code,
    }


def machine_info() -> dict:
    """CPU model, cores, memory, torch threads and the load average now."""
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpu_count_available"] = len(os.sched_getaffinity(0))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["load_average_at_start"] = list(os.getloadavg())
    import torch

    import cryocaps

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["cryocaps"] = cryocaps.__version__
    info["cryocaps_commit"] = git_commit()
    return info


def git_commit() -> str | None:
    """The repository's commit, with "+changes" when its tracked files differ from it (None
    outside a git checkout): which code a benchmark measured."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        if run.returncode:
            raise OSError(run.stderr)
        return run.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return None
    return head + ("+changes" if changed else "")


def machine_sentence(machine: dict) -> str:
    """One markdown line naming the machine, for a RESULTS.md section."""
    load_start = ", ".join(f"{v:.1f}" for v in machine["load_average_at_start"])
    text = (
        f"Machine: {machine.get('cpu_model', '?')}, "
        f"{machine.get('cpu_count_available', machine['cpu_count'])} CPU cores, "
        f"{machine.get('memory_gib', '?')} GiB, {machine['platform']}; torch {machine['torch']} "
        f"({machine['torch_threads']} threads), cryocaps {machine['cryocaps']}"
        + (f" (commit {machine['cryocaps_commit']})" if machine.get("cryocaps_commit") else "")
        + ". "
        f"Load average at start {load_start}"
    )
    if "load_average_at_end" in machine:
        text += ", at end " + ", ".join(f"{v:.1f}" for v in machine["load_average_at_end"])
    return text + " (1, 5, 15 min; the machine is shared, so timings vary with it)."


def read_run_json(folder: Path) -> dict:
    """``folder/run.json`` as a dict ({} when absent)."""
    path = folder / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def training_summary(run_dir: Path) -> dict:
    """Steps, seconds per step, stop reason, batch and patch of a ``cryocaps train`` run."""
    info = read_run_json(run_dir)
    results = info.get("results", {}) or {}
    parameters = info.get("parameters", {}) or {}
    summary = {
        name: results[key]
        for key, name in (
            ("steps_done", "steps"),
            ("epochs_done", "epochs_done"),
            ("stopped", "stopped"),
            ("seconds", "train_loop_seconds"),
            ("seconds_per_step", "seconds_per_step"),
            ("samples_per_second", "samples_per_second"),
            ("best_epoch", "best_epoch"),
            ("best_val_loss", "best_val_loss"),
            ("best_mean_dice", "best_mean_val_dice"),
            ("n_train_particles", "n_train_particles"),
            ("n_val_particles", "n_val_particles"),
        )
        if key in results
    }
    summary |= {
        key: parameters[key] for key in ("batch_size", "patch_size", "lr") if key in parameters
    }
    metrics = run_dir / "metrics.csv"
    if "steps" not in summary and metrics.exists():
        import pandas as pd

        frame = pd.read_csv(metrics)
        if "step" in frame:
            summary["steps"] = int(frame["step"].max())
    return summary


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path``, replacing it: for scratch files (partial results, stamps).

    Raw results that RESULTS.md quotes go through :func:`append_run`, which never drops a run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


REPO = Path(__file__).resolve().parents[1]


def portable(value):
    """``value`` with every path inside this checkout made relative to it (``benchmarks/...``),
    and paths beside it relative to it too (``../shared/...``): no folder of the machine a
    benchmark ran on goes into the repository."""
    if isinstance(value, str):
        for folder, shown in ((REPO, ""), (REPO.parent, "../")):
            # only where a path starts: "benchmarks/work/x" is not the folder "/work"
            value = re.sub(rf"(?<![\w.\-/]){re.escape(f'{folder}{os.sep}')}", shown, value)
        return value
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [portable(item) for item in value]
    return value


def runs_in(data) -> list[dict]:
    """The runs a raw results file holds: ``{"runs": [...]}``, or one run (the older layout)."""
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return data["runs"]
    return [data] if data else []


def latest_run(path: Path) -> dict:
    """The newest run of a raw results file (``{}`` when it does not exist)."""
    runs = runs_in(json.loads(path.read_text())) if path.exists() else []
    return runs[-1] if runs else {}


def append_run(path: Path, run: dict) -> None:
    """Add ``run`` (with its paths made :func:`portable`) to the raw results file ``path``.

    The file holds ``{"runs": [oldest, ..., newest]}``; a file of one run in the older layout
    becomes the first entry. Tables in RESULTS.md quote these numbers, so no run is dropped.
    """
    earlier = runs_in(json.loads(path.read_text())) if path.exists() else []
    write_json_atomic(path, {"runs": portable([*earlier, run])})


def replace_section(markdown_path: Path, section: str, start_mark: str, end_mark: str) -> None:
    """Put ``section`` (which starts and ends with the marks) into the file, keeping the rest.

    An existing section between the marks is replaced in place; otherwise the section
    is appended. The file is rewritten atomically.
    """
    text = markdown_path.read_text() if markdown_path.exists() else "# Benchmark results\n"
    section = portable(section.rstrip("\n"))
    if start_mark in text and end_mark in text:
        head, rest = text.split(start_mark, 1)
        text = head + section + rest.split(end_mark, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = markdown_path.with_name(markdown_path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, markdown_path)


def fmt(value, spec: str = ".2f", unit: str = "") -> str:
    """A number for a table cell; ``–`` for a missing one."""
    if value is None:
        return "–"
    return f"{value:{spec}}{unit}"
