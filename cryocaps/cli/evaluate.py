"""Score picks against ground truth: per-class TP/FP/FN, precision, recall, F1, F-beta.

Picks and true particles (any particle format) are matched one to one per
tomogram and class (Hungarian algorithm) within --tolerance-fraction x the
class radius. Picks on a particle of another class count as class confusions.
--json prints {"classes": ..., "macro": ..., "micro": ...} alone on stdout.
-o REPORT_DIR writes report.json, confusion.csv, pr_curve.png (precision-recall
over pick scores, AUPRC in the legend), matches.csv, overlay PNGs (--overlay),
run.json and pick_thresholds.csv: per class the score threshold with the best F1
here. Score a validation tomogram, then pick the others with
`cryocaps cluster-picks --thresholds REPORT_DIR/pick_thresholds.csv`. With
--labels-pred/--labels-true instead of PICKS TRUTH: voxel Dice per class and,
with <tomo>_probs.mrc beside the predicted maps, voxel AUPRC next to its chance
level (the positive fraction).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from cryocaps.cli.common import (
    ClassesOption,
    CoordsPixelSize,
    CopickObjects,
    CopickSession,
    CopickUser,
    Overwrite,
    Quiet,
    RadiusOption,
    Verbose,
    VoxelSize,
    command_line,
    copick_selection,
    in_range,
    is_quiet,
    narrow_classes,
    positive,
    setup_logging,
    stdout_console,
)
from cryocaps.errors import CryocapsError


def command(
    picks: Annotated[
        Path | None, typer.Argument(help="Picks to score (.star, .tbl, .csv, copick config.json).")
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Argument(
            help="Ground-truth particles (.star, .tbl, .csv, or a copick config.json: its picks, "
            "or --copick-user/--copick-session/--copick-objects; its objects are the classes)."
        ),
    ] = None,
    classes: ClassesOption = None,
    radius_angstrom: RadiusOption = None,
    tolerance_fraction: Annotated[
        float,
        typer.Option(
            "--tolerance-fraction",
            callback=positive,
            help="A pick matches a particle within this fraction of the class radius. "
            "[default: 0.5]",
        ),
    ] = 0.5,
    beta: Annotated[
        float,
        typer.Option(
            "--beta",
            callback=positive,
            help="beta of the F-beta score (the CZII challenge uses 4). [default: 1]",
        ),
    ] = 1.0,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "--out",
            "-o",
            help="Report folder for report.json, PNGs and CSVs. [default: none]",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the scores as JSON on stdout (nothing else). [default: off]"
        ),
    ] = False,
    voxel_size_angstrom: VoxelSize = None,
    tomograms: Annotated[
        list[Path] | None,
        typer.Option(
            "--tomograms",
            help="Tomogram MRC files, .zarr images, folders of them, a copick "
            "config.json[:TYPE@SPACING], or a RELION 5 tomograms.star (repeatable): voxel sizes "
            "(class radii in voxels), sizes for RELION 5 coordinates; only these tomograms are "
            "scored. [default: none: every tomogram of TRUTH]",
        ),
    ] = None,
    coords_pixel_size_angstrom: CoordsPixelSize = None,
    overlay: Annotated[
        list[Path] | None,
        typer.Option(
            "--overlay",
            help="Tomogram MRC or .zarr to draw picks on (repeatable): "
            "REPORT_DIR/overlay_<tomo>.png with true positives, false positives and misses "
            "circled. Needs -o. [default: none]",
        ),
    ] = None,
    overlay_slices: Annotated[
        int,
        typer.Option(
            "--overlay-slices", callback=in_range(1), help="Slabs per overlay figure. [default: 3]"
        ),
    ] = 3,
    labels_pred: Annotated[
        list[Path] | None,
        typer.Option(
            "--labels-pred",
            help="Predicted label maps (files or folders; repeatable) for voxel-level scores. "
            "[default: none]",
        ),
    ] = None,
    labels_true: Annotated[
        list[Path] | None,
        typer.Option(
            "--labels-true",
            help="True label maps (files or folders; repeatable), paired by tomogram name. "
            "[default: none]",
        ),
    ] = None,
    copick_user: CopickUser = None,
    copick_session: CopickSession = None,
    copick_objects: CopickObjects = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    setup_logging(quiet, verbose)
    from cryocaps.io.class_table import load_class_table_beside
    from cryocaps.io.copick_project import is_copick_config

    started = time.time()
    voxel_mode = bool(labels_pred or labels_true)
    _check_options(
        picks,
        truth,
        labels_pred,
        labels_true,
        overlay,
        report_dir,
        tolerance_fraction,
        beta,
        overlay_slices,
    )
    if classes is None and radius_angstrom is None and not voxel_mode and is_copick_config(truth):
        classes = truth  # the project's pickable objects
    full_table, classes = load_class_table_beside(
        [labels_true[0]] if voxel_mode else [truth], classes, radius_angstrom
    )
    class_table = narrow_classes(full_table, copick_objects)
    parameters = {
        "tolerance_fraction": tolerance_fraction,
        "beta": beta,
        "voxel_size_angstrom": voxel_size_angstrom,
        "classes": class_table.to_records(),
    }
    if voxel_mode:
        _voxel_scores(
            labels_pred,
            labels_true,
            class_table,
            {c.label for c in full_table} - {c.label for c in class_table},
            as_json,
            report_dir,
            parameters,
            started,
            overwrite,
        )
        return

    from cryocaps.evaluation import evaluate_files
    from cryocaps.io.particles import tomogram_infos

    infos = tomogram_infos(tomograms) if tomograms else None
    if overlay and infos is None and voxel_size_angstrom is None:
        infos = tomogram_infos(overlay)  # the overlay tomograms give the voxel size
    scores, matching = evaluate_files(
        picks,
        truth,
        class_table,
        voxel_size_angstrom=voxel_size_angstrom,
        tomograms=infos,
        tolerance_fraction=tolerance_fraction,
        beta=beta,
        coords_pixel_size_angstrom=coords_pixel_size_angstrom,
        copick=copick_selection(copick_user, copick_session, copick_objects, voxel_size_angstrom),
    )
    report = None
    if report_dir is not None:
        extras = [*(tomograms or []), *(overlay or []), *([classes] if classes else [])]
        inputs = [picks, truth, *extras]
        report = _write_particle_report(
            report_dir, scores, matching, parameters, overlay, voxel_size_angstrom,
            overlay_slices, overwrite, inputs, started,
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(scores))
        return
    if not is_quiet():
        _print_scores(scores, beta)
        if report is not None:
            _print_threshold_hint(report, scores)
            stdout_console.print(f"Report written to {report_dir}")


def _write_particle_report(
    report_dir, scores, matching, parameters, overlay, voxel_size_angstrom, overlay_slices,
    overwrite, inputs, started,
):  # fmt: skip
    """Report files (tables, PR curves, overlays) and run.json in ``report_dir``; the report."""
    from cryocaps.evaluation import write_report
    from cryocaps.runinfo import write_run_json

    report = write_report(
        report_dir,
        scores,
        matching,
        parameters=parameters,
        overlays=overlay or [],
        overlay_voxel_size_angstrom=voxel_size_angstrom,
        n_slices=overlay_slices,
        overwrite=overwrite,
    )
    write_run_json(
        report_dir,
        command=command_line(),
        inputs=inputs,
        outputs=report.files,
        parameters=parameters,
        timings={"total": round(time.time() - started, 3)},
        results={"macro": scores["macro"], "micro": scores["micro"]},
        started=started,
    )
    return report


def _check_options(
    picks,
    truth,
    labels_pred,
    labels_true,
    overlay,
    report_dir,
    tolerance_fraction,
    beta,
    overlay_slices,
) -> None:
    """Refuse option combinations and values that cannot work, before reading anything."""
    if labels_pred or labels_true:
        if picks is not None or truth is not None:
            raise CryocapsError("give either PICKS TRUTH or --labels-pred/--labels-true, not both")
        if not labels_pred or not labels_true:
            raise CryocapsError("voxel scores need both --labels-pred and --labels-true")
        if overlay:
            raise CryocapsError("--overlay draws picks: it needs PICKS TRUTH, not label maps")
    elif picks is None or truth is None:
        raise CryocapsError(
            "give PICKS and TRUTH particle files (or --labels-pred and --labels-true)"
        )
    if overlay and report_dir is None:
        raise CryocapsError("--overlay writes PNGs into the report folder: give -o REPORT_DIR")
    if not tolerance_fraction > 0:
        raise CryocapsError(f"--tolerance-fraction must be > 0, got {tolerance_fraction}")
    if not beta > 0:
        raise CryocapsError(f"--beta must be > 0, got {beta}")
    if overlay_slices < 1:
        raise CryocapsError(f"--overlay-slices must be >= 1, got {overlay_slices}")


def _print_threshold_hint(report, scores: dict) -> None:
    tuned_f1 = report.tuned_macro_f1()
    if tuned_f1 is None:
        return
    stdout_console.print(
        f"Score thresholds tuned on these picks would give macro F1 {tuned_f1:.3f} here "
        f"(now {scores['macro']['f1']:.3f}); pick other tomograms with\n"
        f"  cryocaps cluster-picks ... --thresholds {report.thresholds_path}",
        highlight=False,
    )


def _print_scores(scores: dict, beta: float) -> None:
    with_fbeta = beta != 1.0
    columns = [
        "class",
        "TP",
        "FP",
        "FN",
        "prec",
        "recall",
        "F1",
        *([f"F{beta:g}"] if with_fbeta else []),
        "dup",
        "conf",
    ]
    rows = []
    for name, entry in scores["classes"].items():
        values = [
            entry[k] if entry[k] is not None else "-"
            for k in ("precision", "recall", "f1", "fbeta")
        ]
        rows.append(
            [
                name,
                entry["tp"],
                entry["fp"],
                entry["fn"],
                *values[:3],
                *(values[3:] if with_fbeta else []),
                entry["duplicates"],
                entry["confused"],
            ]
        )
    for label in ("macro", "micro"):
        entry = scores[label]
        counts = [entry["tp"], entry["fp"], entry["fn"]] if label == "micro" else ["", "", ""]
        rows.append(
            [
                label,
                *counts,
                entry["precision"],
                entry["recall"],
                entry["f1"],
                *([entry["fbeta"]] if with_fbeta else []),
                "",
                "",
            ]
        )
    _compact_table(
        f"Particle picking scores (match within {_tolerance_text(scores)}; "
        "dup = duplicate picks, conf = picks on another class)",
        columns,
        rows,
        rule_before=len(scores["classes"]),
    )


def _tolerance_text(scores: dict) -> str:
    return ", ".join(
        f"{name} {entry['tolerance_angstrom']:g} Å" for name, entry in scores["classes"].items()
    )


def _compact_table(
    title: str, columns: list[str], rows: list[list], rule_before: int | None = None
) -> None:
    """A narrow rich table on stdout (fits 80 columns for a handful of classes)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False
    )
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for k, row in enumerate(rows):
        table.add_row(
            *[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row],
            end_section=k + 1 == rule_before,
        )
    stdout_console.print(table)


def _voxel_scores(
    labels_pred,
    labels_true,
    class_table,
    left_out,
    as_json,
    report_dir,
    parameters,
    started,
    overwrite,
) -> None:
    from cryocaps.evaluation import voxel_report
    from cryocaps.runinfo import write_run_json

    result = voxel_report(
        labels_pred,
        labels_true,
        class_table,
        report_dir=report_dir,
        parameters=parameters,
        overwrite=overwrite,
        ignored_labels=left_out,
    )
    scores, names = result.scores, result.tomograms
    if report_dir is not None:
        write_run_json(
            report_dir,
            command=command_line(),
            inputs=result.inputs,
            outputs=result.files,
            parameters=parameters,
            timings={"total": round(time.time() - started, 3)},
            results=scores["macro"],
            started=started,
        )
    if as_json:
        typer.echo(json.dumps(scores))
        return
    if is_quiet():
        return
    with_auprc = "auprc" in scores["macro"]
    columns = ["class", "Dice", "prec", "recall", "true voxels", "pos. fraction"]
    columns += ["AUPRC", "chance"] if with_auprc else []
    rows = []
    for name, entry in scores["classes"].items():
        row = [
            name,
            entry["dice"],
            entry["precision"],
            entry["recall"],
            entry["tp_voxels"] + entry["fn_voxels"],
            f"{entry['positive_fraction']:.2e}",
        ]
        row += [entry["auprc"], f"{entry['auprc_baseline']:.2e}"] if with_auprc else []
        rows.append(row)
    macro = scores["macro"]
    row = ["macro", macro["dice"], "", "", "", ""]
    row += [macro["auprc"], f"{macro['auprc_baseline']:.2e}"] if with_auprc else []
    rows.append(row)
    _compact_table(
        f"Voxel scores over {len(names)} tomogram(s)", columns, rows, rule_before=len(rows) - 1
    )
