"""Run the whole pipeline on simulated data: simulate → make-masks → train → segment →
cluster-picks → evaluate.

Five small tomograms with the built-in particle classes are simulated; three
train the network (for --minutes of wall time, or --epochs), the other two are
segmented. The fourth is the validation tomogram: its picks are scored to tune a
score threshold per class. The fifth, never seen before, is picked with those
thresholds and scored against its ground truth. Each stage is printed as the
`cryocaps` command a user would type, and run exactly like that. Ends with
the per-class precision / recall / F1 table and the paths of the figures.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from cryocaps.cli.common import Overwrite, Seed, console, in_range, positive, setup_logging
from cryocaps.demo import DemoSettings, check_settings, demo_figures, demo_stages
from cryocaps.errors import CryocapsError

NO_ARGS_IS_HELP = False
DEFAULTS = DemoSettings()


def command(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder for everything the demo writes. [default: cryocaps_demo]")
    ] = Path("cryocaps_demo"),
    minutes: Annotated[
        float,
        typer.Option(
            "--minutes",
            callback=positive,
            help=f"Training budget in minutes of wall time. [default: {DEFAULTS.minutes:g}]",
        ),
    ] = DEFAULTS.minutes,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Network to train: ucaps (3D-UCaps), ucaps-fast (3D-UCaps, one routing iteration) "
            f"or unet. [default: {DEFAULTS.model}]",
        ),
    ] = DEFAULTS.model,
    shape: Annotated[
        str,
        typer.Option(
            "--shape",
            help="Size of each simulated tomogram, Z,Y,X voxels (10 Å). "
            f"[default: {DEFAULTS.shape}]",
        ),
    ] = DEFAULTS.shape,
    patch_size: Annotated[
        int | None,
        typer.Option(
            "--patch-size",
            callback=in_range(8),
            help="Training patch side in voxels. [default: train's default]",
        ),
    ] = DEFAULTS.patch_size,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            callback=in_range(1),
            help="Train exactly this many epochs instead of for --minutes "
            "(the same steps however fast the machine). "
            "[default: the --minutes budget]",
        ),
    ] = DEFAULTS.epochs,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(
            "--steps-per-epoch",
            callback=in_range(1),
            help="Optimiser steps per epoch. [default: train's default]",
        ),
    ] = DEFAULTS.steps_per_epoch,
    seed: Seed = DEFAULTS.seed,
    overwrite: Overwrite = DEFAULTS.overwrite,
) -> None:
    setup_logging()
    from cryocaps.cli.main import app
    from cryocaps.io.files import check_folder

    settings = DemoSettings(
        minutes, model, shape, patch_size, epochs, steps_per_epoch, seed, overwrite
    )
    check_settings(settings)
    check_folder(out_dir, "OUT_DIR")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CryocapsError(
            f"{out_dir} exists and is not empty; pass --overwrite or choose another folder"
        )
    started = time.perf_counter()
    stages = demo_stages(out_dir, settings)
    for number, argv in enumerate(stages, start=1):
        console.rule(f"[bold]{number}/{len(stages)} {argv[0]}")
        console.print("$ " + shlex.join(["cryocaps", *argv]), style="cyan", soft_wrap=True)
        code = app(argv, standalone_mode=False, prog_name="cryocaps")
        if isinstance(code, int) and code != 0:
            raise typer.Exit(code)
    minutes_taken = (time.perf_counter() - started) / 60
    console.rule("[bold]done")
    console.print(f"Demo finished in {minutes_taken:.1f} min. Figures:")
    for figure in demo_figures(out_dir):
        console.print(f"  {figure}")
