"""Run the whole pipeline on simulated data: simulate → make-masks → train → segment → cluster-picks → evaluate.

Five small tomograms with the built-in particle classes are simulated; three
train the network (for --minutes of wall time), the other two are segmented.
The fourth is the validation tomogram: its picks are scored to tune a score
threshold per class. The fifth, never seen before, is picked with those
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

from cryocaps.cli.common import Overwrite, Seed, console, setup_logging
from cryocaps.errors import CryocapsError

NO_ARGS_IS_HELP = False
VALIDATION_TOMOGRAM = "tomo_04"
TEST_TOMOGRAM = "tomo_05"


def _stages(
    out: Path, minutes: float, model: str, seed: int, shape: str, patch_size: int | None, overwrite: bool
) -> list[list[str]]:
    data, masks, run, seg, val = out / "data", out / "masks", out / "run", out / "segmentation", out / "validation"
    tomograms = data / "tomograms"
    again = ["--overwrite"] if overwrite else []
    train_tomograms = [arg for i in (1, 2, 3) for arg in ("--tomograms", str(tomograms / f"tomo_0{i}.mrc"))]
    train_labels = [arg for i in (1, 2, 3) for arg in ("--labels", str(masks / f"tomo_0{i}_labels.mrc"))]
    val_tomogram = str(tomograms / f"{VALIDATION_TOMOGRAM}.mrc")
    test_tomogram = str(tomograms / f"{TEST_TOMOGRAM}.mrc")
    patch = ["--patch-size", str(patch_size)] if patch_size else []
    truth = [str(data / "particles.csv"), "--classes", str(data / "classes.csv")]
    return [
        ["simulate", str(data), "--n-tomograms", "5", "--shape", shape, "--seed", str(seed), "--preview", *again],
        ["make-masks", str(data / "particles.star"), "--tomograms", str(tomograms),
         "--classes", str(data / "classes.csv"), "-o", str(masks), *again],
        ["train", *train_tomograms, *train_labels, "--classes", str(masks / "classes.csv"),
         "--model", model, "--max-minutes", f"{minutes:g}", *patch, "--seed", str(seed), "-o", str(run), *again],
        ["segment", val_tomogram, test_tomogram, "--model", str(run), "--probabilities", "-o", str(seg), *again],
        # validation: tune one score threshold per class on a tomogram the network did not train on
        ["cluster-picks", str(seg / f"{VALIDATION_TOMOGRAM}_labels.mrc"), "-o", str(val / "picks.star"), *again],
        ["evaluate", str(val / "picks.star"), *truth, "--tomograms", val_tomogram, "-o", str(val / "report"),
         *again],
        # test: picked with those thresholds, scored once
        ["cluster-picks", str(seg / f"{TEST_TOMOGRAM}_labels.mrc"), "--thresholds",
         str(val / "report" / "pick_thresholds.csv"), "--format", "relion5", "-o", str(out / "picks.star"), *again],
        ["evaluate", str(out / "picks.star"), *truth, "--tomograms", test_tomogram, "--overlay", test_tomogram,
         "-o", str(out / "report"), *again],
    ]


def command(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder for everything the demo writes. [default: cryocaps_demo]")
    ] = Path("cryocaps_demo"),
    minutes: Annotated[
        float, typer.Option("--minutes", help="Training budget in minutes of wall time. [default: 5]")
    ] = 5.0,
    model: Annotated[
        str, typer.Option("--model", help="Network to train: ucaps (3D-UCaps) or unet. [default: ucaps]")
    ] = "ucaps",
    shape: Annotated[
        str, typer.Option("--shape", help="Size of each simulated tomogram, Z,Y,X voxels (10 Å). [default: 64,128,128]")
    ] = "64,128,128",
    patch_size: Annotated[
        int | None, typer.Option("--patch-size", help="Training patch side in voxels. [default: train's default]")
    ] = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    setup_logging()
    from cryocaps.cli.main import app

    if not minutes > 0:
        raise CryocapsError(f"--minutes must be > 0, got {minutes}")
    if model not in ("ucaps", "unet"):
        raise CryocapsError(f"--model {model!r}: choose ucaps or unet")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CryocapsError(f"{out_dir} exists and is not empty; pass --overwrite or choose another folder")
    started = time.perf_counter()
    stages = _stages(out_dir, minutes, model, seed, shape, patch_size, overwrite)
    for number, argv in enumerate(stages, start=1):
        console.rule(f"[bold]{number}/{len(stages)} {argv[0]}")
        console.print("$ " + shlex.join(["cryocaps", *argv]), style="cyan", soft_wrap=True)
        code = app(argv, standalone_mode=False, prog_name="cryocaps")
        if isinstance(code, int) and code != 0:
            raise typer.Exit(code)
    minutes_taken = (time.perf_counter() - started) / 60
    console.rule("[bold]done")
    console.print(f"Demo finished in {minutes_taken:.1f} min. Figures:")
    for figure in (
        out_dir / "data" / f"preview_{TEST_TOMOGRAM}.png",
        out_dir / "run" / "learning_curve.png",
        *sorted((out_dir / "report").glob("*.png")),
    ):
        if figure.exists():
            console.print(f"  {figure}")
