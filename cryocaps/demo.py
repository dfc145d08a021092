"""The demo as data: the ``cryocaps`` command lines that take simulated data to scored picks.

Five small tomograms with the built-in particle classes are simulated; three
(:data:`TRAIN_TOMOGRAMS`) train the network, the other two are segmented. The
fourth (:data:`VALIDATION_TOMOGRAM`) tunes a score threshold per class; the fifth
(:data:`TEST_TOMOGRAM`), never seen before, is picked with those thresholds and
scored against its ground truth. The CLI prints each stage and runs it exactly
as a user would type it. This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryocaps.errors import CryocapsError
from cryocaps.models import available_models, model_class

__all__ = [
    "DemoSettings",
    "N_TOMOGRAMS",
    "TEST_TOMOGRAM",
    "TRAIN_TOMOGRAMS",
    "VALIDATION_TOMOGRAM",
    "check_settings",
    "demo_figures",
    "demo_stages",
]

N_TOMOGRAMS = 5
TRAIN_TOMOGRAMS = ("tomo_01", "tomo_02", "tomo_03")
VALIDATION_TOMOGRAM = "tomo_04"
TEST_TOMOGRAM = "tomo_05"


@dataclass
class DemoSettings:
    """What the demo's stages are built from (the ``cryocaps demo`` options)."""

    minutes: float = 5.0  # training budget, wall time
    model: str = "ucaps"
    shape: str = "64,128,128"  # each simulated tomogram, Z,Y,X voxels of 10 Å
    patch_size: int | None = None  # None: train's default
    epochs: int | None = None  # train exactly this many epochs instead of for ``minutes``
    steps_per_epoch: int | None = None  # None: train's default
    seed: int = 0
    overwrite: bool = False


def check_settings(settings: DemoSettings) -> None:
    """Refuse settings the demo cannot run with (one-line :class:`CryocapsError`)."""
    if not settings.minutes > 0:
        raise CryocapsError(f"--minutes must be > 0, got {settings.minutes}")
    if settings.model not in available_models():
        raise CryocapsError(
            f"--model {settings.model!r}: choose one of {', '.join(available_models())}"
        )
    if settings.epochs is not None and settings.epochs < 1:
        raise CryocapsError(f"--epochs must be >= 1, got {settings.epochs}")
    if settings.steps_per_epoch is not None and settings.steps_per_epoch < 1:
        raise CryocapsError(f"--steps-per-epoch must be >= 1, got {settings.steps_per_epoch}")
    # train's refusal would come after simulate has written its data: refuse it first (a bad
    # --shape itself is refused by simulate, before it writes anything)
    if settings.patch_size is not None:
        multiple = model_class(settings.model).size_multiple
        smallest = min(_sizes(settings.shape), default=settings.patch_size)
        if not multiple <= settings.patch_size <= smallest or settings.patch_size % multiple:
            raise CryocapsError(
                f"--patch-size {settings.patch_size}: must be a multiple of {multiple} for "
                f"{settings.model}, at most the smallest side of --shape {settings.shape}"
            )


def _sizes(shape: str) -> list[int]:
    """The sizes in ``--shape`` (none if it does not parse: simulate names the problem)."""
    try:
        return [int(v) for v in shape.replace("x", ",").split(",")]
    except ValueError:
        return []


def demo_stages(out: Path, settings: DemoSettings) -> list[list[str]]:
    """The demo's ``cryocaps`` command lines (without the program name), in order, writing
    under ``out``."""
    data, masks, run = out / "data", out / "masks", out / "run"
    segmentation, validation = out / "segmentation", out / "validation"
    tomograms = data / "tomograms"
    again = ["--overwrite"] if settings.overwrite else []
    train_inputs = [
        arg for name in TRAIN_TOMOGRAMS for arg in ("--tomograms", str(tomograms / f"{name}.mrc"))
    ]
    train_inputs += [
        arg for name in TRAIN_TOMOGRAMS for arg in ("--labels", str(masks / f"{name}_labels.mrc"))
    ]
    val_tomogram = str(tomograms / f"{VALIDATION_TOMOGRAM}.mrc")
    test_tomogram = str(tomograms / f"{TEST_TOMOGRAM}.mrc")
    truth = [str(data / "particles.csv"), "--classes", str(data / "classes.csv")]
    return [
        ["simulate", str(data), "--n-tomograms", str(N_TOMOGRAMS), "--shape", settings.shape,
         "--seed", str(settings.seed), "--preview", *again],
        ["make-masks", str(data / "particles.star"), "--tomograms", str(tomograms),
         "--classes", str(data / "classes.csv"), "-o", str(masks), *again],
        ["train", *train_inputs, "--classes", str(masks / "classes.csv"), "--model", settings.model,
         *_training_length(settings), "--seed", str(settings.seed), "-o", str(run), *again],
        ["segment", val_tomogram, test_tomogram, "--model", str(run), "--probabilities",
         "-o", str(segmentation), *again],
        # validation: tune one score threshold per class on a tomogram the network did not train
        # on, from all its picks (not those the model's own thresholds keep)
        ["cluster-picks", str(segmentation / f"{VALIDATION_TOMOGRAM}_labels.mrc"),
         "--thresholds", "none", "-o", str(validation / "picks.star"), *again],
        ["evaluate", str(validation / "picks.star"), *truth, "--tomograms", val_tomogram,
         "-o", str(validation / "report"), *again],
        # test: picked with those thresholds, scored once
        ["cluster-picks", str(segmentation / f"{TEST_TOMOGRAM}_labels.mrc"),
         "--thresholds", str(validation / "report" / "pick_thresholds.csv"), "--format", "relion5",
         "-o", str(out / "picks.star"), *again],
        ["evaluate", str(out / "picks.star"), *truth, "--tomograms", test_tomogram,
         "--overlay", test_tomogram, "-o", str(out / "report"), *again],
    ]  # fmt: skip


def _training_length(settings: DemoSettings) -> list[str]:
    """Train's options for how long (a fixed number of epochs, or the wall-time budget) and on
    what."""
    if settings.epochs is not None:  # reproducible: the same steps on any machine
        length = ["--epochs", str(settings.epochs)]
    else:
        length = ["--max-minutes", f"{settings.minutes:g}"]
    if settings.steps_per_epoch is not None:
        length += ["--steps-per-epoch", str(settings.steps_per_epoch)]
    if settings.patch_size:
        length += ["--patch-size", str(settings.patch_size)]
    return length


def demo_figures(out: Path) -> list[Path]:
    """The figures worth looking at after the demo (those that exist)."""
    figures = [
        out / "data" / f"preview_{TEST_TOMOGRAM}.png",
        out / "run" / "learning_curve.png",
        *sorted((out / "report").glob("*.png")),
    ]
    return [figure for figure in figures if figure.exists()]
