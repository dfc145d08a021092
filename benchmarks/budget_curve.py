"""Accuracy against training minutes: cryocaps' models and DeepFinder on one data set.

Each budget is one ``vs_deepfinder.py`` run (same data, same validation tomogram, same
matcher, same machine) with ``--minutes`` set to it; the points are kept in
``benchmarks/results/budget_curve.json`` and added to by later runs, so a curve can be
built budget by budget across sessions; a point replaced by a later one of the same tool and
budget (or dropped with ``--drop``) moves to ``budget_curve_replaced.json``, never lost.
Writes ``benchmarks/results/budget_curve.png`` (macro F1 and macro precision against
minutes, one line per tool) and the section between ``<!-- budget_curve:start -->`` and
``<!-- budget_curve:end -->`` of RESULTS.md.

    python benchmarks/budget_curve.py --minutes 4,12,36          # ~3 h 20 min on 2 cores
    python benchmarks/budget_curve.py --minutes 4 --add benchmarks/results/vs_deepfinder.json
                                    # a 4-minute run, plus the 12-minute points of the last
                                    # vs_deepfinder run (same data set and seed)
    python benchmarks/budget_curve.py --render                   # only the PNG and the section
    python benchmarks/budget_curve.py --render --drop 'cryocaps ucaps-fast@12'   # minus a point

Every point records its budget, tool, steps done, macro and worst-class F1 and macro
precision with validation-tuned thresholds and without (CLI defaults; DeepFinder without
cluster-size thresholds), and whether DeepFinder learned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _bench import append_run, fmt, latest_run, replace_section, say, utc_now, write_json_atomic

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "budget_curve.json"
REPLACED_JSON = HERE / "results" / "budget_curve_replaced.json"
RESULTS_PNG = HERE / "results" / "budget_curve.png"
RESULTS_MD = HERE / "RESULTS.md"
START_MARK = "<!-- budget_curve:start -->"
END_MARK = "<!-- budget_curve:end -->"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", default="", help="comma-separated training budgets to run, e.g. 4,12,36"
    )
    parser.add_argument(
        "--dataset", default="procedural", help="vs_deepfinder.py data set [default: procedural]"
    )
    parser.add_argument(
        "--models",
        default="ucaps,ucaps-fast,unet",
        help="cryocaps models [default: ucaps,ucaps-fast,unet]",
    )
    parser.add_argument(
        "--add",
        type=Path,
        action="append",
        default=[],
        help="also take the points of this vs_deepfinder results JSON (its data set and seed "
        "must match); repeatable",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=HERE / "work" / "budget_curve",
        help="scratch folder [default: benchmarks/work/budget_curve]",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the data and every tool [default: 0]"
    )
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="TOOL@MINUTES",
        help="remove a stored point, e.g. 'cryocaps ucaps-fast@12' (one measured on another "
        "machine); repeatable",
    )
    parser.add_argument("--render", action="store_true", help="only redraw the PNG and section")
    args = parser.parse_args(argv)
    args.minutes = [float(m) for m in args.minutes.split(",") if m.strip()]
    return args


def points_from(report: dict, dataset: str, seed: int) -> list[dict]:
    """One point per tool of a vs_deepfinder report's data set (none if it lacks it)."""
    settings = report["settings"]
    if report["settings"].get("quick") or dataset not in report["datasets"]:
        return []
    if int(settings.get("seed", 0)) != seed:
        raise SystemExit(f"--add: the report was run with seed {settings.get('seed')}, not {seed}")
    points = []
    probe = (report.get("conv3d_probe") or {}).get("start") or {}
    for key, entry in report["datasets"][dataset]["tools"].items():
        if "error" in entry:
            continue
        minutes = settings["minutes"] if key != "deepfinder" else settings["df_minutes"]
        detail = entry["detail"]
        defaults = entry.get("at_defaults") or {}
        learned = entry.get("learned")
        points.append(
            {
                "tool": entry["tool"],
                "minutes": float(minutes),
                "run": report["started"],
                "steps": entry["train"].get("steps"),
                "macro_f1": entry["macro_f1"],
                "worst_class_f1": entry["worst_class_f1"],
                "macro_precision": detail["macro"]["precision"],
                "macro_f1_defaults": defaults.get("macro_f1"),
                "macro_precision_defaults": macro_precision(defaults),
                "learned": None if learned is None else bool(learned["verdict"]),
                "seconds_per_step": entry["train"].get("seconds_per_step"),
                "conv3d_gflops_at_start": probe.get("gflops_per_second"),
            }
        )
    return points


def macro_precision(defaults: dict) -> float | None:
    """Mean per-class precision of an ``at_defaults`` entry (classes without picks count 0)."""
    classes = defaults.get("classes") or {}
    if not classes:
        return None
    return sum((c.get("precision") or 0.0) for c in classes.values()) / len(classes)


def run_budget(args, minutes: float) -> dict:
    """One vs_deepfinder.py run at this budget; its report."""
    work = args.work / f"{minutes:g}min"
    command = [
        sys.executable, str(HERE / "vs_deepfinder.py"), "--datasets", args.dataset,
        "--minutes", f"{minutes:g}", "--models", ",".join(args.models.split(",")),
        "--seed", str(args.seed), "--throughput-minutes", "0", "--no-write", "--work", str(work),
    ]  # fmt: skip
    say(f"budget {minutes:g} min: {' '.join(command[1:])}")
    subprocess.run(command, check=True)
    return json.loads((work / "partial_results.json").read_text())


def merge(store: dict, dataset: str, points: list[dict]) -> None:
    """Add points to the store; a later point replaces one of the same tool and budget (the
    earlier one is kept in REPLACED_JSON)."""
    kept = store.setdefault(dataset, [])
    for point in points:
        same = [p for p in kept if (p["tool"], p["minutes"]) == (point["tool"], point["minutes"])]
        keep_replaced(dataset, same)
        kept[:] = [p for p in kept if p not in same]
        kept.append(point)
    kept.sort(key=lambda p: (p["tool"], p["minutes"]))


def keep_replaced(dataset: str, points: list[dict]) -> None:
    for point in points:
        append_run(REPLACED_JSON, {"dataset": dataset, "replaced": utc_now(), **point})


def plot(store: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(store)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.6 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets, strict=True):
        tools = sorted({p["tool"] for p in store[dataset]})
        for tool in tools:
            points = [p for p in store[dataset] if p["tool"] == tool]
            minutes = [p["minutes"] for p in points]
            for ax, key, default_key in (
                (row[0], "macro_f1", "macro_f1_defaults"),
                (row[1], "macro_precision", "macro_precision_defaults"),
            ):
                line = ax.plot(minutes, [p[key] or 0 for p in points], "o-", label=tool)[0]
                ax.plot(
                    minutes,
                    [p[default_key] or 0 for p in points],
                    "x--",
                    color=line.get_color(),
                    alpha=0.6,
                )
        for ax, title in zip(row, ("macro F1", "macro precision"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("training minutes (2 CPU cores)")
            ax.set_ylim(0, 1)
            ax.set_title(f"{dataset}: {title}")
            budgets = sorted({p["minutes"] for p in store[dataset]})
            ax.set_xticks(budgets, [f"{m:g}" for m in budgets])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle("solid: validation-tuned thresholds; dashed: defaults (no validation tomogram)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(store: dict) -> str:
    lines = [
        START_MARK,
        "## Accuracy against training minutes (`benchmarks/budget_curve.py`)",
        "",
        "Each budget is one `vs_deepfinder.py` run on the data set named (same data, validation "
        "tomogram, matcher and machine for every tool); F1 and precision on the test tomogram, "
        "with the validation-tuned thresholds and, after the slash, without them (CLI "
        "defaults; DeepFinder without cluster-size thresholds). Plot: "
        "`benchmarks/results/budget_curve.png`.",
        "",
    ]
    for dataset, points in sorted(store.items()):
        budgets = sorted({p["minutes"] for p in points})
        tools = sorted({p["tool"] for p in points})
        lines += [
            f"### {dataset}",
            "",
            "| tool | " + " | ".join(f"{m:g} min" for m in budgets) + " |",
            "|---" * (len(budgets) + 1) + "|",
        ]
        for tool in tools:
            cells = []
            for minutes in budgets:
                found = [p for p in points if p["tool"] == tool and p["minutes"] == minutes]
                cells.append(point_cell(found[0]) if found else "not run")
            lines.append(f"| {tool} | " + " | ".join(cells) + " |")
        lines += ["", "Runs (UTC) and the machine's speed in each:", ""]
        for run in sorted({p["run"] for p in points}):
            lines.append(f"- {run}: {run_speed([p for p in points if p['run'] == run])}")
        lines.append("")
    lines.append(END_MARK)
    return "\n".join(lines) + "\n"


def run_speed(points: list[dict]) -> str:
    """The conv3d probe at the run's start and each tool's seconds per training step."""
    probe = next(
        (p["conv3d_gflops_at_start"] for p in points if p.get("conv3d_gflops_at_start")), None
    )
    steps = ", ".join(
        f"{p['tool']} {p['seconds_per_step']:.2f} s/step ({p['minutes']:g} min)"
        for p in points
        if p.get("seconds_per_step")
    )
    text = f"conv3d probe {probe:.0f} GFLOP/s at start" if probe else "conv3d probe not recorded"
    return f"{text}; {steps}" if steps else text


def point_cell(point: dict) -> str:
    text = (
        f"F1 {fmt(point['macro_f1'])} / {fmt(point['macro_f1_defaults'])}, "
        f"P {fmt(point['macro_precision'])} / {fmt(point['macro_precision_defaults'])}, "
        f"worst {fmt(point['worst_class_f1'])}, {point['steps'] or '?'} steps"
    )
    if point.get("learned") is False:
        text += " (did not learn)"
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    store = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    store.pop("updated", None)
    if not args.render:
        reports = (latest_run(path) for path in args.add)
        for report in reports:
            merge(store, args.dataset, points_from(report, args.dataset, args.seed))
        for minutes in args.minutes:
            report = run_budget(args, minutes)
            merge(store, args.dataset, points_from(report, args.dataset, args.seed))
            write_json_atomic(RESULTS_JSON, {**store, "updated": utc_now()})
    for item in args.drop:
        tool, _, minutes = item.rpartition("@")
        for dataset, points in store.items():
            dropped = [p for p in points if (p["tool"], p["minutes"]) == (tool, float(minutes))]
            keep_replaced(dataset, dropped)
            points[:] = [p for p in points if p not in dropped]
    if not store:
        raise SystemExit("no points: give --minutes or --add")
    write_json_atomic(RESULTS_JSON, {**store, "updated": utc_now()})
    plot(store, RESULTS_PNG)
    replace_section(RESULTS_MD, section(store), START_MARK, END_MARK)
    say(f"wrote {RESULTS_JSON}, {RESULTS_PNG} and the section of {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
