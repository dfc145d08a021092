"""Make training label maps from particle coordinates: one map per tomogram.

Writes OUT_DIR/<tomo>_labels.mrc with the tomogram's shape, voxel size and
origin (uint8, 0 = background, class labels from the class table, 255 = unknown
with --unannotated unknown or candidates; float16 (C, Z, Y, X) soft targets with --shape
gaussian), OUT_DIR/classes.csv (the
class table used, for train) and OUT_DIR/run.json. Coordinates may be RELION
3/4/5 STAR, STOPGAP motivelists, Dynamo .tbl, CSV or a copick config.json (its
picks, or --copick-user/--copick-session/--copick-objects); particles are matched
to tomograms by name (a copick run's tomogram by its run). Only the tomograms'
headers (OME-Zarr: metadata) are read, except with --unannotated candidates.
"""

from __future__ import annotations

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
    OutDir,
    Overwrite,
    Quiet,
    RadiusOption,
    Verbose,
    VoxelSize,
    command_line,
    console,
    copick_selection,
    in_range,
    narrow_classes,
    positive,
    print_table,
    progress,
    setup_logging,
)


def command(
    coordinates: Annotated[
        list[Path],
        typer.Argument(
            help="Particle files (.star, .tbl, .csv, copick config.json) in any supported format.",
            show_default=False,
        ),
    ],
    tomograms: Annotated[
        list[Path],
        typer.Option(
            "--tomograms",
            "-t",
            help="Tomograms (MRC files, .zarr OME-Zarr images, folders of them, a copick "
            "config.json[:TYPE@SPACING], or a RELION 5 tomograms.star); only headers are read "
            "(voxels too with --unannotated candidates). "
            "Repeat for several.",
            show_default=False,
        ),
    ],
    out_dir: OutDir,
    classes_path: ClassesOption = None,
    radius_angstrom: RadiusOption = None,
    radius_scale: Annotated[
        float,
        typer.Option(
            "--radius-scale",
            callback=positive,
            help="Multiply every class radius by this factor (no unit; sphere and gaussian "
            "shapes). [default: 1.0]",
        ),
    ] = 1.0,
    shape: Annotated[
        str,
        typer.Option(
            "--shape",
            help="sphere (solid, radius from the class table), gaussian (float16 soft targets "
            "exp(-d²/2σ²), σ = radius/2, cut at 3σ) or template (the class's density map from "
            "classes.csv, rotated by the particle's RELION angles and thresholded). "
            "[default: sphere]",
        ),
    ] = "sphere",
    template_threshold: Annotated[
        float,
        typer.Option(
            "--template-threshold",
            callback=in_range(0, 1),
            help="With --shape template: inside where the density exceeds this fraction of the "
            "template's maximum (0-1). [default: 0.2]",
        ),
    ] = 0.2,
    unannotated: Annotated[
        str,
        typer.Option(
            "--unannotated",
            help="What the places no annotated particle covers are: background (every particle "
            "is annotated); unknown for partial annotations (label 255, which training "
            "skips) except a shell one class radius wide around each annotated particle, "
            "which is background; or candidates: unknown only around the places that look "
            "like the annotated particles (a blob detector thresholded on their own "
            "responses; reads the tomograms' voxels), background elsewhere. With unknown "
            "voxels, training sets no score thresholds on its held-out region (precision "
            "there is a lower bound). [default: background]",
        ),
    ] = "background",
    coords_pixel_size_angstrom: CoordsPixelSize = None,
    voxel_size_angstrom: VoxelSize = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Stop with an error when particles lie outside their tomogram. [default: off]",
        ),
    ] = False,
    copick_user: CopickUser = None,
    copick_session: CopickSession = None,
    copick_objects: CopickObjects = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    setup_logging(quiet, verbose)
    from cryocaps.io.class_table import load_class_table
    from cryocaps.io.particles import tomogram_files
    from cryocaps.masks import make_masks, tomogram_geometry
    from cryocaps.runinfo import write_run_json

    started = time.time()
    classes = narrow_classes(load_class_table(classes_path, radius_angstrom), copick_objects)
    infos = tomogram_geometry(tomograms, voxel_size_angstrom)
    with progress("Drawing masks", len(infos)) as advance:
        summary = make_masks(
            coordinates,
            infos,
            classes,
            out_dir,
            single_class=classes_path is None,
            shape=shape,
            radius_scale=radius_scale,
            coords_pixel_size_angstrom=coords_pixel_size_angstrom,
            template_threshold=template_threshold,
            unannotated=unannotated,
            strict=strict,
            overwrite=overwrite,
            copick=copick_selection(copick_user, copick_session, copick_objects),
            progress=advance,
            tomogram_files=tomogram_files(tomograms) if unannotated == "candidates" else None,
        )
    parameters = {
        "classes": str(classes_path) if classes_path else None,
        "radius_angstrom": radius_angstrom,
        "radius_scale": radius_scale,
        "shape": shape,
        "template_threshold": template_threshold if shape == "template" else None,
        "unannotated": unannotated,
        "coords_pixel_size_angstrom": coords_pixel_size_angstrom,
        "voxel_size_angstrom": voxel_size_angstrom,
        "strict": strict,
        "command_line": command_line(),
    }
    write_run_json(
        out_dir,
        command="make-masks",
        inputs=[*coordinates, *tomograms],
        outputs=summary["outputs"],
        parameters=parameters,
        timings={"total": round(time.time() - started, 3)},
        results=summary,
        started=started,
    )
    if not quiet:
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    print_table(
        f"Label maps ({summary['shape']}, {summary['voxel_size_angstrom']:g} Å voxels)",
        ["class", "label", "particles", "voxels"],
        [[name, c["label"], c["particles"], c["voxels"]] for name, c in summary["classes"].items()],
    )
    if summary["unannotated"] != "background":
        unknown = sum(t["unknown_voxels"] for t in summary["tomograms"])
        console.print(f"Unknown (label 255, skipped in training): {unknown} voxels")
