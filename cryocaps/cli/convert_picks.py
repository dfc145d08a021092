"""Convert particle lists between RELION 5/4/3 STAR, STOPGAP motivelists, Dynamo tables, CSV
and copick.

The input format is detected from each file (a copick config.json: every pick of the
project, or of --copick-user/--copick-session/--copick-objects, in voxels at each run's
voxel spacing or --voxel-size-angstrom); --format (or the output's extension: .star =
relion5, .tbl = dynamo, .csv = csv, a copick config.json = copick) names the output
format (copick: into that project as --copick-user, --copick-session). Positions,
angles, classes, scores and tomogram names are kept. Writes run.json beside OUT
(not into a copick project).
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
    OutputFormat,
    Overwrite,
    Quiet,
    Verbose,
    VoxelSize,
    command_line,
    copick_selection,
    is_quiet,
    print_table,
    setup_logging,
)
from cryocaps.errors import CryocapsError

MAX_SUMMARY_ROWS = 20


def command(
    picks: Annotated[
        list[Path],
        typer.Argument(
            help="Particle files (.star RELION 3/4/5 or STOPGAP, .tbl Dynamo, .csv, copick "
            "config.json), any mix."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "--out", "-o", help="Output particle file (or copick config.json)."
        ),
    ],
    format: OutputFormat = None,
    tomograms: Annotated[
        list[Path] | None,
        typer.Option(
            "--tomograms",
            help="Tomogram MRC files or .zarr images, folders of them, a copick "
            "config.json[:TYPE@SPACING], or a RELION 5 tomograms.star (repeatable): sizes and "
            "voxel sizes for RELION 5 centred Å coordinates, names for STOPGAP/Dynamo tomogram "
            "numbers. [default: none]",
        ),
    ] = None,
    classes: ClassesOption = None,
    coords_pixel_size_angstrom: CoordsPixelSize = None,
    voxel_size_angstrom: VoxelSize = None,
    copick_user: CopickUser = None,
    copick_session: CopickSession = None,
    copick_objects: CopickObjects = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    setup_logging(quiet, verbose)
    from cryocaps.io.class_table import read_classes
    from cryocaps.io.particles import (
        PROJECT_FORMATS,
        check_format,
        convert_particles,
        format_from_extension,
        tomogram_infos,
    )
    from cryocaps.runinfo import write_run_json

    started = time.time()
    if format is not None:
        check_format(format)
    format = format or format_from_extension(output)
    for path in picks:
        if not path.exists():
            raise CryocapsError(f"{path}: no such particle file")
    class_table = read_classes(classes) if classes is not None else None
    infos = tomogram_infos(tomograms) if tomograms else None
    table = convert_particles(
        picks,
        output,
        format=format,
        tomograms=infos,
        classes=class_table,
        coords_pixel_size_angstrom=coords_pixel_size_angstrom,
        copick=copick_selection(copick_user, copick_session, copick_objects, voxel_size_angstrom),
        overwrite=overwrite,
    )
    counts = table.groupby(["tomo", "class_name"], sort=True).size()
    if format not in PROJECT_FORMATS:  # a run.json does not belong in a copick project's folder
        write_run_json(
            output.parent,
            command=command_line(),
            inputs=[*picks, *(tomograms or []), *([classes] if classes else [])],
            outputs=[output],
            parameters={
                "format": format,
                "coords_pixel_size_angstrom": coords_pixel_size_angstrom,
            },
            timings={"total": round(time.time() - started, 3)},
            results={
                "particles": len(table),
                "per_tomogram_class": [
                    {"tomo": tomo, "class_name": name, "particles": int(n)}
                    for (tomo, name), n in counts.items()
                ],
            },
            started=started,
        )
    if is_quiet():
        return
    title = f"{len(table)} particles -> {output}"
    if len(counts) <= MAX_SUMMARY_ROWS:
        rows = [[tomo, name, int(n)] for (tomo, name), n in counts.items()]
        print_table(title, ["tomogram", "class", "particles"], rows)
    else:  # many tomograms: one row per class
        per_class = table.groupby("class_name", sort=True)
        rows = [[name, rows["tomo"].nunique(), len(rows)] for name, rows in per_class]
        print_table(title, ["class", "tomograms", "particles"], rows)
