"""Paper-style tables: 3D-UCaps and the U-Net per SHREC-like class, validation and test.

Follows Tables 3-5 of Hajarolasvadi et al. (BMC Bioinformatics 2022): particle
precision, recall and F1 per scenario and model on a validation and a held-out
test tomogram, and training / test times. Everything runs through the cryocaps
CLI as separate processes (timed whole, as a user would see them):

1. per scenario, ``cryocaps simulate`` makes 5 tomograms from the structures
   folder (``--structures DIR --classes-from ...``): tomo_01-03 train, tomo_04
   validation (given to ``train --val-tomograms``), tomo_05 test;
2. ``cryocaps train --model M --max-minutes BUDGET`` for each model (same budget);
3. ``cryocaps segment`` on tomo_04 and on tomo_05 (one process each),
   ``cryocaps cluster-picks`` on each label map, ``cryocaps evaluate -o``
   against the simulated truth; the test picks are filtered with the per-class
   score thresholds that evaluate tuned on the validation tomogram
   (``cluster-picks --thresholds``), and the unfiltered test scores are kept too;
4. writes ``benchmarks/results/paper_tables.json`` and the section between
   ``<!-- paper_tables:start -->`` and ``<!-- paper_tables:end -->`` of
   ``benchmarks/RESULTS.md`` (the rest of that file is kept).

The paper's classes are 4d8q, 1bxn and 3gl1; 4d8q is not in the structures
folder, so 4cr2 (26S proteasome, also large) stands in for it. Scenario
``3gl1-p32`` trains on the 3gl1 data with the paper's 32³ patches for the small
class; it is skipped when the 3gl1 scenario already used 32³ (train's automatic
patch size does for small particles; ``--patch-size 64`` gives the paper's setting).
``--quick`` checks the plumbing (tiny tomograms, 0.5-minute budgets); its numbers say
nothing about the models.

Run: ``python benchmarks/paper_tables.py [--quick]`` (in the venv cryocaps is installed in).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from _bench import (
    append_run,
    cryocaps_cmd,
    fmt,
    latest_run,
    machine_info,
    machine_sentence,
    read_run_json,
    replace_section,
    run_measured,
    say,
    train_cmd,
    training_summary,
    utc_now,
    write_json_atomic,
)

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "paper_tables.json"
RESULTS_MD = HERE / "RESULTS.md"
START_MARK = "<!-- paper_tables:start -->"
END_MARK = "<!-- paper_tables:end -->"
# ../shared beside the repository, as in DESIGN.md
STRUCTURES = HERE.parent.parent / "shared" / "data" / "structures"

MODEL_TITLES = {"ucaps": "3D-UCaps", "unet": "U-Net"}
ROLES = {"validation": "tomo_04", "test": "tomo_05"}
TRAIN_TOMOGRAMS = ["tomo_01", "tomo_02", "tomo_03"]

# Scenario -> the classes simulated (and hence the data set) and training changes.
SCENARIOS = {
    "4cr2": {"classes": ["4cr2"], "patch_size": None, "title": "4cr2 (for 4d8q)"},
    "1bxn": {"classes": ["1bxn"], "patch_size": None, "title": "1bxn"},
    "3gl1": {"classes": ["3gl1"], "patch_size": None, "title": "3gl1"},
    "mix": {"classes": ["4cr2", "1bxn", "3gl1"], "patch_size": None, "title": "multi-class"},
    "3gl1-p32": {"classes": ["3gl1"], "patch_size": 32, "title": "3gl1, patch 32"},
}
QUICK_SCENARIOS = ["3gl1", "3gl1-p32", "mix"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock training budget per model and scenario, minutes "
        "[default: 5; 0.5 with --quick]",
    )
    parser.add_argument(
        "--scenarios",
        default=None,
        help=f"comma-separated subset of {','.join(SCENARIOS)} "
        f"[default: all; {','.join(QUICK_SCENARIOS)} with --quick]",
    )
    parser.add_argument(
        "--models", default="ucaps,unet", help="models, comma-separated [default: ucaps,unet]"
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="training patch side in voxels for every scenario but 3gl1-p32 (paper: 64) "
        "[default: train's automatic size, 32 or enough for the largest particle]",
    )
    parser.add_argument(
        "--max-val-patches",
        type=int,
        default=None,
        help="train --max-val-patches, validation patches per epoch "
        "[default: train's; 8 with --quick]",
    )
    parser.add_argument("--snr", type=float, default=0.4, help="simulated SNR [default: 0.4]")
    parser.add_argument(
        "--shape",
        default=None,
        help="tomogram shape Z,Y,X in voxels [default: 64,160,160; 48,64,64 with --quick]",
    )
    parser.add_argument(
        "--structures",
        type=Path,
        default=STRUCTURES,
        help=f"structures folder [default: {STRUCTURES}]",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for simulate and train [default: 0]"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="plumbing check: tiny tomograms, 0.5-minute budgets, 3 scenarios",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=HERE / "work" / "paper_tables",
        help="scratch folder (git-ignored) [default: benchmarks/work/paper_tables]",
    )
    parser.add_argument(
        "--fresh-data", action="store_true", help="simulate again even if the data exist"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the section; leave RESULTS.md and the JSON"
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only rewrite the RESULTS.md section from this results JSON (no runs)",
    )
    args = parser.parse_args(argv)
    if args.minutes is None:
        args.minutes = 0.5 if args.quick else 5.0
    if args.max_val_patches is None and args.quick:
        # 3gl1 tomograms hold ~90 particles: validating on all of them would dwarf the budget.
        args.max_val_patches = 8
    if args.shape is None:
        args.shape = "48,64,64" if args.quick else "64,160,160"
    scenarios = args.scenarios or ",".join(QUICK_SCENARIOS if args.quick else SCENARIOS)
    args.scenarios = [s.strip() for s in scenarios.split(",") if s.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}; use {', '.join(SCENARIOS)}")
    unknown = [m for m in args.models if m not in MODEL_TITLES]
    if unknown:
        parser.error(f"--models: unknown {unknown}; use {', '.join(MODEL_TITLES)}")
    if not args.structures.is_dir():
        parser.error(f"--structures: no folder {args.structures}")
    return args


# ---------------------------------------------------------------------- data


def simulate(classes: list[str], args) -> dict:
    """``cryocaps simulate`` 5 tomograms of these classes (reused when made with the same
    options).
    """
    folder = args.work / "data" / "_".join(classes)
    options = [
        "--n-tomograms", "5", "--shape", args.shape, "--snr", str(args.snr),
        "--seed", str(args.seed),
        "--structures", str(args.structures), "--classes-from", ",".join(classes),
    ]  # fmt: skip
    stamp = folder / "simulate_options.json"
    if (
        folder.exists()
        and not args.fresh_data
        and stamp.exists()
        and json.loads(stamp.read_text()) == options
    ):
        say(f"data {'+'.join(classes)}: reusing {folder}")
        timing = json.loads(stamp.with_name("simulate_timing.json").read_text())
    else:
        if folder.exists():
            shutil.rmtree(folder)
        say(f"data {'+'.join(classes)}: cryocaps simulate {' '.join(options)}")
        timing = run_measured(
            cryocaps_cmd("simulate", folder, *options),
            args.work / "logs" / f"simulate_{folder.name}.log",
        )
        stamp.with_name("simulate_timing.json").write_text(json.dumps(timing))
        stamp.write_text(json.dumps(options))
    tomograms = {path.stem: path for path in sorted((folder / "tomograms").glob("*.mrc"))}
    needed = [*TRAIN_TOMOGRAMS, *ROLES.values()]
    missing = [
        name
        for name in needed
        if name not in tomograms or not (folder / "labels" / f"{name}.mrc").exists()
    ]
    if missing:
        raise SystemExit(f"{folder}: simulate wrote no tomogram or label map for {missing}")
    return {
        "folder": folder,
        "options": options,
        "simulate": timing,
        "tomograms": tomograms,
        "labels": {name: folder / "labels" / f"{name}.mrc" for name in tomograms},
        "classes_csv": folder / "classes.csv",
        "particles": folder / "particles.csv",
    }


# ---------------------------------------------------------------------- one model on one scenario


def train(model: str, scenario: dict, data: dict, args, folder: Path) -> dict:
    run_dir = folder / "model"
    names = [*TRAIN_TOMOGRAMS, ROLES["validation"]]
    patch_size = scenario["patch_size"] or args.patch_size
    extra = ["--patch-size", patch_size] if patch_size else []
    if args.max_val_patches:
        extra += ["--max-val-patches", args.max_val_patches]
    measured = run_measured(
        train_cmd(
            [data["tomograms"][n] for n in names],
            [data["labels"][n] for n in names],
            data["classes_csv"],
            run_dir,
            model,
            args.minutes,
            args.seed,
            *extra,
            val_tomogram=ROLES["validation"],
        ),
        folder / "logs" / "train.log",
    )
    return measured | training_summary(run_dir)


def pick_and_score(
    label_map: Path, tomogram: Path, data: dict, folder: Path, tag: str, extra=()
) -> dict:
    """``cluster-picks`` (+ ``extra`` options) and ``evaluate -o``: timings, scores, report
    folder.
    """
    logs = folder / "logs"
    picks = folder / f"picks_{tag}.csv"
    pick = run_measured(
        cryocaps_cmd(
            "cluster-picks", label_map, "-o", picks, "--classes", data["classes_csv"], *extra
        ),
        logs / f"cluster_picks_{tag}.log",
    )
    report = folder / f"report_{tag}"
    run_measured(
        cryocaps_cmd(
            "evaluate",
            picks,
            data["particles"],
            "--classes",
            data["classes_csv"],
            "--tomograms",
            tomogram,
            "-o",
            report,
        ),
        logs / f"evaluate_{tag}.log",
    )
    scores = json.loads((report / "report.json").read_text())
    return {
        "pick": pick,
        "report": report,
        "scores": {k: scores[k] for k in ("classes", "macro", "micro")},
    }


def segment_pick_score(role: str, data: dict, folder: Path, thresholds: Path | None = None) -> dict:
    """Segment, pick and score one tomogram; each stage its own timed process.

    With ``thresholds`` (the validation report's pick_thresholds.csv) the picks
    are filtered by them, and the unfiltered scores are kept beside.
    """
    name = ROLES[role]
    tomogram = data["tomograms"][name]
    seg_dir = folder / f"segment_{role}"
    segment = run_measured(
        cryocaps_cmd("segment", tomogram, "--model", folder / "model", "-o", seg_dir),
        folder / "logs" / f"segment_{role}.log",
    )
    inner = (read_run_json(seg_dir).get("results", {}) or {}).get("tomograms", [{}])[0]
    segment |= {
        "inference_seconds": (inner.get("seconds") or {}).get("total"),
        "window": inner.get("patch_size"),
        "voxels": inner.get("voxels"),
    }
    label_map = seg_dir / f"{name}_labels.mrc"
    raw = pick_and_score(label_map, tomogram, data, folder, role)
    entry = {"tomogram": name, "segment": segment, "pick": raw["pick"], "scores": raw["scores"]}
    entry["thresholds_csv"] = str(raw["report"] / "pick_thresholds.csv")
    if thresholds is not None:
        tuned = pick_and_score(
            label_map, tomogram, data, folder, f"{role}_thresholds", ["--thresholds", thresholds]
        )
        entry |= {
            "pick": tuned["pick"],
            "scores": tuned["scores"],
            "scores_without_thresholds": raw["scores"],
        }
    return entry


def run_model(model: str, scenario: dict, data: dict, args, folder: Path) -> dict:
    if folder.exists():
        shutil.rmtree(folder)
    say(f"  {model}: train {args.minutes:g} min")
    entry = {"model": model, "train": train(model, scenario, data, args, folder)}
    say(f"  {model}: segment, pick, evaluate validation ({ROLES['validation']})")
    entry["validation"] = segment_pick_score("validation", data, folder)
    # the test tomogram is picked with per-class score thresholds tuned on the validation one
    say(f"  {model}: segment, pick (validation thresholds), evaluate test ({ROLES['test']})")
    entry["test"] = segment_pick_score(
        "test", data, folder, Path(entry["validation"]["thresholds_csv"])
    )
    return entry


# ---------------------------------------------------------------------- report


def class_scores(entry: dict | None, role: str, class_name: str | None) -> dict:
    """P/R/F1 of one class (or the macro mean with ``None``) from a model entry."""
    if not entry or role not in entry:
        return {}
    scores = entry[role]["scores"]
    return scores["macro"] if class_name is None else scores["classes"].get(class_name, {})


def score_rows(scenarios: dict, models: list[str], role: str) -> list[str]:
    """Markdown rows: scenario, class, #true, then P, R, F1 per model."""
    lines = []
    for result in scenarios.values():
        if "skipped" in result:
            continue
        classes = result["classes"]
        rows = [(name, name) for name in classes]
        if len(classes) > 1:
            rows.append(("macro mean", None))
        for label, class_name in rows:
            cells = [result["title"], label]
            truths = [
                class_scores(result["models"].get(m), role, class_name).get("n_truth")
                for m in models
            ]
            cells.append(str(next((t for t in truths if t is not None), "–")) if class_name else "")
            for model in models:
                entry = result["models"].get(model)
                if entry and "error" in entry:
                    cells += ["failed"] * 3
                    continue
                found = class_scores(entry, role, class_name)
                cells += [fmt(found.get(k)) for k in ("precision", "recall", "f1")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def time_rows(scenarios: dict, models: list[str]) -> list[str]:
    lines = []
    for result in scenarios.values():
        for model in models:
            entry = result.get("models", {}).get(model)
            if not entry:
                continue
            cells = [result["title"], MODEL_TITLES[model]]
            if "error" in entry:
                lines.append("| " + " | ".join(cells + ["failed"] + ["–"] * 7) + " |")
                continue
            train = entry["train"]
            patch = train.get("patch_size")
            cells += [
                str(train.get("steps", "–")),
                f"{train.get('batch_size', '?')} × {patch}³",
                fmt(train.get("seconds_per_step"), ".1f"),
                fmt(train["wall_seconds"], ".0f"),
                fmt(entry["validation"]["segment"]["wall_seconds"], ".1f"),
                fmt(entry["test"]["segment"]["wall_seconds"], ".1f"),
                fmt(entry["test"]["segment"].get("inference_seconds"), ".1f"),
                fmt(entry["test"]["pick"]["wall_seconds"], ".1f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def trained_patch_sizes(result: dict) -> set:
    """The patch sides the scenario's models actually trained with (from their run.json)."""
    return {
        entry["train"].get("patch_size")
        for entry in result.get("models", {}).values()
        if "train" in entry
    }


def redundant_patch32(key: str, done: dict) -> str | None:
    """Why the 3gl1-p32 scenario would repeat the 3gl1 one, or None."""
    base = done.get("3gl1")
    if key != "3gl1-p32" or not base or trained_patch_sizes(base) != {32}:
        return None
    return (
        "the 3gl1 scenario already trained with 32³ patches (train's automatic patch size "
        "for a small particle); run with --patch-size 64 for the paper's comparison"
    )


def patch32_note(scenarios: dict, models: list[str]) -> str | None:
    """What the 32³ patches changed for 3gl1, read from the two runs."""
    base, small = scenarios.get("3gl1"), scenarios.get("3gl1-p32")
    if not small:
        return None
    if "skipped" in small:
        return f"3gl1, patch 32: not run, because {small['skipped']}."
    if not base:
        return (
            "3gl1 with 32³ patches ran without the default-patch 3gl1 scenario, "
            "so there is nothing to compare."
        )
    parts = []
    for model in models:
        a, b = base["models"].get(model), small["models"].get(model)
        if not a or not b or "error" in a or "error" in b:
            continue
        f1 = [class_scores(e, "test", "3gl1").get("f1") for e in (a, b)]
        steps = [e["train"].get("steps") for e in (a, b)]
        sps = [e["train"].get("seconds_per_step") for e in (a, b)]
        parts.append(
            f"{MODEL_TITLES[model]} test F1 {fmt(f1[0])} → {fmt(f1[1])}"
            + (f" ({f1[1] - f1[0]:+.2f})" if None not in f1 else "")
            + f", {steps[0]} → {steps[1]} steps in the same budget "
            f"({fmt(sps[0], '.1f')} → {fmt(sps[1], '.1f')} s/step)"
        )
    patch = "/".join(f"{p}³" for p in sorted(trained_patch_sizes(base) - {None})) or "?"
    return (
        f"3gl1, patch {patch} → 32³ (same data, budget and segment defaults): "
        + "; ".join(parts)
        + "."
    )


def markdown_section(report: dict) -> str:
    settings = report["settings"]
    models = settings["models"]
    scenarios = report["scenarios"]
    model_heads = " | ".join(f"{MODEL_TITLES[m]} {k}" for m in models for k in ("P", "R", "F1"))
    quick = " — QUICK MODE: plumbing check only, numbers mean nothing" if settings["quick"] else ""
    lines = [
        START_MARK,
        "## Paper-style tables: 3D-UCaps and U-Net per class (`benchmarks/paper_tables.py`)",
        "",
        f"Run {report.get('finished', report['started'] + ' (partial results)')} UTC{quick}. "
        f"Command: `{report['command']}`",
        "",
        machine_sentence(report["machine"]),
        "",
        f"Data: per scenario `cryocaps simulate --n-tomograms 5 --shape {settings['shape']} "
        f"--snr {settings['snr']} --seed {settings['seed']} "
        f"--structures {settings['structures']} --classes-from …` (10 Å voxels); "
        "tomo_01–03 train, tomo_04 validation (`train --val-tomograms tomo_04`), "
        "tomo_05 held-out test. "
        "The paper's 4d8q is not in the structures folder: "
        "4cr2 (26S proteasome, large) stands in for it. "
        f"Budget: {settings['minutes']:g} min wall-clock training per model and scenario "
        "(`train --max-minutes`), "
        + (
            f"`train --patch-size {settings['patch_size']}` (all but 3gl1-p32), "
            if settings.get("patch_size")
            else ""
        )
        + (
            f"`train --max-val-patches {settings['max_val_patches']}`, "
            if settings.get("max_val_patches")
            else ""
        )
        + "otherwise CLI defaults for train, segment and cluster-picks; "
        "scores by `cryocaps evaluate` (tolerance 0.5 × class radius). "
        "Times are whole processes (imports and file I/O included).",
        "",
    ]
    for role, title in (
        ("validation", "Validation (tomo_04), cf. paper Table 3"),
        (
            "test",
            "Test (tomo_05, picked with the score thresholds tuned on tomo_04), cf. paper Table 4",
        ),
    ):
        lines += [
            f"### {title}",
            "",
            f"| scenario | class | true | {model_heads} |",
            "|---" * (3 + 3 * len(models)) + "|",
            *score_rows(scenarios, models, role),
            "",
        ]
    unfiltered = [
        f"{result['title']} {MODEL_TITLES[model]} "
        f"{fmt(entry['test']['scores_without_thresholds']['macro']['f1'])} "
        f"→ {fmt(entry['test']['scores']['macro']['f1'])}"
        for result in scenarios.values()
        for model, entry in result.get("models", {}).items()
        if "scores_without_thresholds" in entry.get("test", {})
    ]
    if unfiltered:
        lines += [
            "Test macro F1 without → with the validation thresholds: "
            + "; ".join(unfiltered)
            + ".",
            "",
        ]
    lines += [
        "### Training and test time, cf. paper Table 5",
        "",
        "| scenario | model | steps | batch × patch | s / step | train wall (s) "
        "| segment tomo_04 (s) | segment tomo_05 (s) | of which inference (s) "
        "| picking tomo_05 (s) |",
        "|---" * 10 + "|",
        *time_rows(scenarios, models),
        "",
    ]
    note = patch32_note(scenarios, models)
    if note:
        lines += [note, ""]
    for result in scenarios.values():
        for model, entry in result.get("models", {}).items():
            if "error" in entry:
                lines.append(
                    f"{result['title']} {MODEL_TITLES[model]} FAILED: "
                    f"`{entry['error'].splitlines()[0]}`"
                )
                lines.append("")
    lines += ["Raw numbers: `benchmarks/results/paper_tables.json`.", END_MARK]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        report = latest_run(args.render)
        replace_section(RESULTS_MD, markdown_section(report), START_MARK, END_MARK)
        say(f"rewrote the paper_tables section of {RESULTS_MD} from {args.render}")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {
        "command": shlex.join(
            ["benchmarks/paper_tables.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "started": utc_now(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "scenarios": {},
    }
    say(
        f"load average {report['machine']['load_average_at_start']}, "
        f"torch threads {report['machine']['torch_threads']}"
    )
    for key in args.scenarios:
        scenario = SCENARIOS[key]
        say(f"scenario {key}")
        redundant = redundant_patch32(key, report["scenarios"])
        if redundant:
            report["scenarios"][key] = {"title": scenario["title"], "skipped": redundant}
            say(f"  skipped: {redundant}")
            continue
        data = simulate(scenario["classes"], args)
        result = {
            "title": scenario["title"],
            "classes": scenario["classes"],
            "patch_size": scenario["patch_size"],
            "data": str(data["folder"]),
            "simulate_options": data["options"],
            "simulate": data["simulate"],
            "models": {},
        }
        report["scenarios"][key] = result
        for model in args.models:
            try:
                result["models"][model] = run_model(
                    model, scenario, data, args, args.work / key / model
                )
                test = result["models"][model]["test"]["scores"]["macro"]
                say(f"  {model}: test macro F1 {fmt(test.get('f1'))}")
            except (RuntimeError, OSError, ValueError, KeyError) as error:
                # One failing run must not throw away the others' numbers.
                result["models"][model] = {"model": model, "error": str(error)}
                say(f"  {model}: FAILED: {error}")
            write_json_atomic(args.work / "partial_results.json", report)

    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["finished"] = utc_now()
    report["total_seconds"] = time.time() - started
    if args.no_write:
        print(markdown_section(report))
    else:
        append_run(RESULTS_JSON, report)  # first: the numbers survive a rendering bug
        replace_section(RESULTS_MD, markdown_section(report), START_MARK, END_MARK)
        say(f"wrote {RESULTS_JSON} and the paper_tables section of {RESULTS_MD}")
    say(f"done in {report['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
