"""Turn label maps into particle picks (one pick per particle), in any particle format.

Reads <tomo>_labels.mrc maps (files or folders) and, when present beside them,
<tomo>_probs.mrc (class probabilities) or <tomo>_score.mrc for the pick scores.
Methods: components (connected components, touching particles split at the
distance transform's maxima, fragments of one particle merged; the default,
most accurate on noisy synthetic segmentations), meanshift (bandwidth = class
radius) and peaks (non-maximum suppression of the probability map).

Size limits are multiples of the class's label volume V (classes.csv's
label_volume_angstrom3, what one particle covered in the training labels, else
the sphere of its radius): picks smaller than --min-size-fraction x V are
dropped; components larger than --max-size-factor x V are split into
particle-sized pieces and the pieces still larger dropped; components larger
than 40 V (no cluster of touching particles) are dropped unsplit. Picks smaller
than --relative-min-size of the class's typical pick in the map (taken from its
picks within those limits only, and never above 0.75 V, so background blobs of a
class that ran away cannot drop its particles), or scoring below --min-score
(or the per-class --thresholds that `cryocaps evaluate -o` tunes on a validation
tomogram; by default those training calibrated, in the pick_thresholds.csv segment
wrote beside the maps), are dropped too. A class that covers more than 3x its share of the
training label maps (classes.csv's label_fraction) gets one warning line: the
network has likely called background that class (classes without a label_fraction,
as in tables older than this, are not judged). Classes come from --classes,
else classes.csv beside the maps; a label in a map that the class table does not
list is refused. Writes run.json beside OUT.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cryocaps.cli.common import (
    ClassesOption,
    CopickObjects,
    CopickSession,
    CopickUser,
    OutputFormat,
    Overwrite,
    Quiet,
    RadiusOption,
    Verbose,
    VoxelSize,
    command_line,
    copick_selection,
    finite,
    in_range,
    is_quiet,
    log,
    narrow_classes,
    positive,
    print_table,
    progress,
    setup_logging,
)
from cryocaps.errors import CryocapsError

METHOD_NAMES = ("components", "meanshift", "peaks")
DEFAULT_PICK_METHOD = METHOD_NAMES[0]


def command(
    maps: Annotated[
        list[Path],
        typer.Argument(
            help="Label maps <tomo>_labels.mrc, or folders of them (a folder's *_labels.mrc files, "
            "else all its MRC files)."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "--out",
            "-o",
            help="Output particle file (.star, .tbl, .csv), or a copick config.json "
            "(--format copick).",
        ),
    ],
    format: OutputFormat = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="Picking method: components, meanshift or peaks. [default: for each class, the "
            "method training chose on its held-out region, from the pick_thresholds.csv beside "
            "the maps (or --thresholds) where it has a method column; else components]",
        ),
    ] = None,
    classes: ClassesOption = None,
    radius_angstrom: RadiusOption = None,
    min_size_fraction: Annotated[
        float,
        typer.Option(
            "--min-size-fraction",
            callback=in_range(0),
            help="Drop picks with fewer voxels than this fraction of the class's label volume: "
            "label_volume_angstrom3 in classes.csv (what one particle covered in the training "
            "label maps; make-masks records it), else the sphere 4/3 pi r^3. [default: 0.2]",
        ),
    ] = 0.2,
    max_size_factor: Annotated[
        float,
        typer.Option(
            "--max-size-factor",
            help="Split components of more than this many label volumes into particle-sized "
            "pieces (centres at distance-transform maxima), and drop pieces still larger; "
            "components of more than 40 label volumes are dropped unsplit. [default: 3.0]",
        ),
    ] = 3.0,
    relative_min_size: Annotated[
        float,
        typer.Option(
            "--relative-min-size",
            callback=in_range(0),
            help="Drop picks with fewer voxels than this fraction of the class's typical pick in "
            "the same map (the 90th percentile of the sizes of its picks within the size limits "
            "above, so blobs cannot set it): background fragments are far smaller than the "
            "particles the network segments whole. 0 keeps them. [default: 0.5]",
        ),
    ] = 0.5,
    min_score: Annotated[
        float | None,
        typer.Option(
            "--min-score",
            callback=finite,
            help="Drop picks scoring below this (mean class probability 0-1 with probability maps, "
            "else the size in voxels). [default: keep all]",
        ),
    ] = None,
    thresholds: Annotated[
        str | None,
        typer.Option(
            "--thresholds",
            help="Per-class score thresholds: the pick_thresholds.csv that `cryocaps evaluate -o` "
            "writes for a validation tomogram picked with the same settings; none: no "
            "thresholds. [default: the pick_thresholds.csv segment wrote beside the label maps "
            "(calibrated during training on held-out annotated regions), if there is one]",
            show_default=False,
        ),
    ] = None,
    use_probabilities: Annotated[
        bool,
        typer.Option(
            "--probabilities/--no-probabilities",
            help="Use <tomo>_probs.mrc / <tomo>_score.mrc beside the label maps for scores. "
            "[default: on]",
        ),
    ] = True,
    voxel_size_angstrom: VoxelSize = None,
    coords_pixel_size_angstrom: Annotated[
        float | None,
        typer.Option(
            "--coords-pixel-size-angstrom",
            callback=positive,
            help="Write RELION 3/4, STOPGAP and Dynamo coordinates in pixels of this size (Å). "
            "[default: the label maps' voxels]",
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
    from cryocaps.io.particles import (
        write_particles,
    )
    from cryocaps.picking import find_label_maps, pick_files, summary_by_class
    from cryocaps.runinfo import write_run_json

    started = time.time()
    _check_options(format, method, thresholds, min_score)
    label_paths = find_label_maps(maps)
    class_table, classes, left_out = _class_table(
        label_paths, classes, radius_angstrom, copick_objects
    )
    thresholds, min_score, method = _score_limits(
        label_paths, class_table, thresholds, min_score, use_probabilities, method
    )
    project_output = _check_output(output, format, overwrite)

    with progress("Picking", total=len(label_paths)) as advance:
        picks, infos, inputs = pick_files(
            label_paths,
            class_table,
            method=method,
            min_size_fraction=min_size_fraction,
            max_size_factor=max_size_factor,
            relative_min_size=relative_min_size,
            min_score=min_score,
            use_probabilities=use_probabilities,
            voxel_size_angstrom=voxel_size_angstrom,
            progress=lambda tomo: advance(info=tomo),
            ignored_labels=left_out,
        )
    picking_seconds = time.time() - started
    if picks.empty:
        _warn_no_particles(min_size_fraction)
    write_particles(
        picks,
        output,
        format=format,
        tomograms=infos,
        classes=class_table,
        coords_pixel_size_angstrom=coords_pixel_size_angstrom,
        copick=copick_selection(copick_user, copick_session, copick_objects),
        overwrite=overwrite,
    )
    summary = summary_by_class(picks, class_table)
    if not project_output:  # no run.json inside a copick project's folder
        write_run_json(
            output.parent,
            command=command_line(),
            inputs=[
                *inputs,
                *([classes] if classes else []),
                *([thresholds] if thresholds else []),
            ],
            outputs=[output],
            parameters={
                "method": method,
                "min_size_fraction": min_size_fraction,
                "max_size_factor": max_size_factor,
                "relative_min_size": relative_min_size,
                "min_score": min_score,
                "thresholds": str(thresholds) if thresholds else None,
                "format": format or output.suffix,
                "use_probabilities": use_probabilities,
                "classes": class_table.to_records(),
            },
            timings={
                "picking": round(picking_seconds, 3),
                "total": round(time.time() - started, 3),
            },
            results={"picks": len(picks), "per_class": summary.to_dict(orient="records")},
            started=started,
        )
    if not is_quiet():
        _print_summary(summary, f"{len(picks)} picks from {len(label_paths)} map(s) -> {output}")


def _warn_no_particles(min_size_fraction: float) -> None:
    log.warning(
        "no particles found: the maps hold no blob of a listed class larger than "
        "--min-size-fraction %g of its label volume; writing an empty particle file",
        min_size_fraction,
    )


def _thresholds_file(given: str | None, min_score, label_paths, score_kind) -> Path | None:
    """``--thresholds`` as a file: as given, none for ``none``, by default the companion
    pick_thresholds.csv beside the maps (unless --min-score is given); says which it uses."""
    from cryocaps.io.thresholds import companion_thresholds

    if given is not None:
        return None if given.strip().lower() == "none" else Path(given)
    found = companion_thresholds(label_paths) if min_score is None else None
    if found is not None and score_kind is None:
        log.warning(
            "%s not used: some maps have probability or score maps beside them and others "
            "not, so their picks are scored differently; pick them separately",
            found,
        )
        return None
    if found is not None:
        log.info(
            "score thresholds for %s scores from %s (--thresholds none to pick without)",
            score_kind.replace("_", " "),
            found,
        )
    return found


def _check_output(output, format, overwrite: bool) -> bool:
    """Refuse an output file that exists (without --overwrite); True for a copick project,
    which exists already and whose writer checks its own picks."""
    from cryocaps.io.files import check_writable
    from cryocaps.io.particles import PROJECT_FORMATS, format_from_extension

    project_output = (format or format_from_extension(output)) in PROJECT_FORMATS
    if not project_output:
        check_writable(output, overwrite)
    return project_output


def _class_table(label_paths, classes, radius_angstrom, copick_objects):
    """The classes to pick (narrowed to --copick-objects), the classes.csv used, and the labels
    left out on purpose (skipped, not refused)."""
    from cryocaps.io.class_table import load_class_table_beside

    full_table, classes = load_class_table_beside(label_paths, classes, radius_angstrom)
    class_table = narrow_classes(full_table, copick_objects)
    left_out = {c.label for c in full_table} - {c.label for c in class_table}
    return class_table, classes, left_out


def _score_limits(label_paths, class_table, thresholds, min_score, use_probabilities, method):
    """The thresholds file used (given, or the companion segment wrote), the minimum score
    (per class from that file, else --min-score) and the picking method (--method, else per
    class from that file's method column, else components)."""
    from cryocaps.io.thresholds import picking_score_kind, read_thresholds_and_methods

    score_kind = picking_score_kind(label_paths, use_probabilities)
    thresholds = _thresholds_file(thresholds, min_score, label_paths, score_kind)
    chosen = {}
    if thresholds is not None:
        min_score, chosen = read_thresholds_and_methods(
            thresholds, class_table, score_kind, METHOD_NAMES
        )
    if method is None and chosen:
        log.info(
            "picking methods from %s: %s",
            thresholds,
            ", ".join(f"{name} {m}" for name, m in chosen.items()),
        )
    return thresholds, min_score, method or chosen or DEFAULT_PICK_METHOD


def _check_options(format, method: str, thresholds, min_score) -> None:
    """Refuse unknown formats and methods, and two score thresholds at once."""
    from cryocaps.io.particles import check_format

    if format is not None:
        check_format(format)
    if method is not None and method not in METHOD_NAMES:
        raise CryocapsError(f"--method {method!r}: use one of {', '.join(METHOD_NAMES)}")
    if thresholds is not None and thresholds.strip().lower() != "none" and min_score is not None:
        raise CryocapsError("--min-score and --thresholds both set a score threshold; give one")


def _print_summary(summary, title: str) -> None:
    """Picks per class (the table of :func:`cryocaps.picking.summary_by_class`)."""

    def shown(value: float):
        return "-" if value != value else value  # NaN: no picks

    rows = [
        [
            r.class_name,
            int(r.picks),
            int(r.tomograms),
            shown(r.median_score),
            shown(r.median_size_voxels),
        ]
        for r in summary.itertuples()
    ]
    columns = ["class", "picks", "tomograms", "median score", "median size (voxels)"]
    print_table(title, columns, rows)
