"""Train a segmentation network (3D-UCaps or U-Net) on tomograms and their label maps.

Patches are cut around particles (connected components of the label maps, or
--coords) with random jitter, plus random background patches, and augmented
with 180° rotations that keep the missing wedge in place. Writes RUN_DIR/
config.json + model.pt (best model, for `cryocaps segment --model RUN_DIR`),
checkpoint_last.pt / checkpoint_best.pt (for --resume), metrics.csv,
learning_curve.png and run.json. Ctrl-C or SIGTERM stop after the current
step with a checkpoint that --resume continues exactly; --max-minutes ends the
last epoch early, validates it and stops. Multi-process: torchrun
--nproc-per-node N -m cryocaps train ... (DistributedDataParallel; --batch-size
is per process).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cryocaps.cli.common import (
    ClassesOption,
    Device,
    Overwrite,
    Quiet,
    Seed,
    Verbose,
    VoxelSize,
    command_line,
    console,
    print_table,
    progress,
    setup_logging,
)
from cryocaps.errors import CryocapsError


def parse_model_options(items: list[str]) -> dict:
    """``["widths=8,8,8", "batch_norm=true"]`` -> ``{"widths": [8, 8, 8], "batch_norm": True}``."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CryocapsError(
                f"--model-option {item!r}: expected KEY=VALUE, e.g. widths=16,24,32"
            )
        values = [_parse_value(part.strip()) for part in text.split(",")]
        options[key.strip()] = values if "," in text else values[0]
    return options


def _parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def command(
    tomograms: Annotated[
        list[Path],
        typer.Option(
            "--tomograms", "-t", help="Tomogram MRC file or folder (repeat the flag for more)."
        ),
    ],
    labels: Annotated[
        list[Path],
        typer.Option(
            "--labels",
            "-l",
            help="Label map file or folder (repeat for more); <tomo>_labels.mrc or <tomo>.mrc, same shape and voxel size as the tomogram.",
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "--output", "-o", help="Run folder for the model, checkpoints and metrics.")
    ],
    classes: ClassesOption = None,
    coords: Annotated[
        list[Path] | None,
        typer.Option(
            "--coords",
            help="Particle file(s) giving the patch centres (STAR/CSV/tbl). [default: connected components of the label maps]",
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model", help="Network: ucaps (3D-UCaps) or unet (DeepFinder). [default: ucaps]"
        ),
    ] = "ucaps",
    model_option: Annotated[
        list[str] | None,
        typer.Option(
            "--model-option",
            help="Network option KEY=VALUE, e.g. widths=16,24,32 (repeatable). [default: paper's]",
        ),
    ] = None,
    patch_size: Annotated[
        int | None,
        typer.Option(
            "--patch-size",
            help="Patch side in voxels (paper: 64). [default: 32, or 2 x the largest particle radius + 8 rounded up to a multiple of 8]",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", help="Patches per step and process (paper: 24). [default: 2]"),
    ] = 2,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Maximum number of epochs. [default: 300]")
    ] = 300,
    steps_per_epoch: Annotated[
        int, typer.Option("--steps-per-epoch", help="Optimiser steps per epoch. [default: 100]")
    ] = 100,
    lr: Annotated[
        float, typer.Option("--lr", help="Adam learning rate (paper: 1e-4). [default: 1e-3]")
    ] = 1e-3,
    lr_schedule: Annotated[
        str,
        typer.Option(
            "--lr-schedule",
            help="none, cosine (over --epochs) or plateau (halve on a stalled val loss). [default: none]",
        ),
    ] = "none",
    patience: Annotated[
        int,
        typer.Option(
            "--patience",
            help="Stop after this many epochs without a better validation score (--select-by); 0 = never. "
            "[default: 20]",
        ),
    ] = 20,
    select_by: Annotated[
        str,
        typer.Option(
            "--select-by",
            help="Keep the model of the epoch with the highest mean validation Dice (dice) or the lowest "
            "validation loss (loss, the paper's rule). [default: dice]",
        ),
    ] = "dice",
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            help="Fraction of each class's particles held out for validation (paper: 0.17). [default: 0.17]",
        ),
    ] = 0.17,
    val_tomograms: Annotated[
        list[str] | None,
        typer.Option(
            "--val-tomograms",
            help="Hold out these whole tomograms (names) for validation instead (repeatable).",
        ),
    ] = None,
    fold: Annotated[
        str | None,
        typer.Option(
            "--fold",
            help="Cross-validation fold k/K, e.g. 2/6: fold k of each class's particles is validation.",
        ),
    ] = None,
    background_fraction: Annotated[
        float,
        typer.Option(
            "--background-fraction",
            help="Fraction of patches placed off the particles (background). [default: 0.3]",
        ),
    ] = 0.3,
    hard_negative_fraction: Annotated[
        float,
        typer.Option(
            "--hard-negatives",
            help="Share of the background patches centred on label-free places of high contrast "
            "(membranes, gold, carbon edges) instead of at random; 0 = all random. [default: 0.5]",
        ),
    ] = 0.5,
    jitter_voxels: Annotated[
        int | None,
        typer.Option(
            "--jitter-voxels",
            help="Random shift of particle patches, voxels per axis. [default: patch size / 4]",
        ),
    ] = None,
    rot90: Annotated[
        bool,
        typer.Option(
            "--rot90", help="Also rotate by 90° about Z (moves the missing wedge). [default: off]"
        ),
    ] = False,
    mirror: Annotated[
        bool,
        typer.Option(
            "--mirror",
            help="Also mirror patches (keeps the wedge, flips particle handedness). [default: off]",
        ),
    ] = False,
    intensity_augmentation: Annotated[
        bool,
        typer.Option(
            "--intensity-augmentation/--no-intensity-augmentation",
            help="Random intensity scale, offset and noise. [default: on]",
        ),
    ] = True,
    max_val_patches: Annotated[
        int,
        typer.Option(
            "--max-val-patches",
            help="At most this many validation patches per epoch. [default: 64]",
        ),
    ] = 64,
    class_weights: Annotated[
        bool,
        typer.Option(
            "--class-weights/--no-class-weights",
            help="Weight the cross-entropy by inverse class frequency. [default: on]",
        ),
    ] = True,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            "--max-minutes",
            help="Wall-time budget in minutes: the epoch running out of time ends early, is validated and checkpointed, and training stops.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in RUN_DIR from checkpoint_last.pt.")
    ] = False,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bfloat16 autocast on CPU (measured 2.7x more steps per minute for the U-Net). "
            "[default: on where the CPU has native bfloat16 (AVX512-BF16 or AMX), else off; "
            "CUDA always uses float16 AMP]",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", help="Torch threads per process. [default: CPUs / processes on this node]"
        ),
    ] = None,
    voxel_size_angstrom: VoxelSize = None,
    seed: Seed = 0,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    setup_logging(quiet, verbose)
    from cryocaps.runinfo import write_run_json
    from cryocaps.training import PAPER, TrainConfig, config_dict, train

    config = TrainConfig(
        tomograms=tomograms,
        labels=labels,
        out_dir=out_dir,
        classes=classes,
        coords=coords or [],
        model=model,
        model_options=parse_model_options(model_option or []),
        patch_size=patch_size,
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        lr_schedule=lr_schedule,
        patience=patience,
        select_by=select_by,
        val_fraction=val_fraction,
        val_tomograms=val_tomograms or [],
        fold=fold,
        background_fraction=background_fraction,
        hard_negative_fraction=hard_negative_fraction,
        jitter_voxels=jitter_voxels,
        rot90=rot90,
        mirror=mirror,
        intensity_augmentation=intensity_augmentation,
        max_val_patches=max_val_patches,
        class_weights=class_weights,
        max_minutes=max_minutes,
        resume=resume,
        overwrite=overwrite,
        seed=seed,
        device=device,
        bf16=bf16,
        voxel_size_angstrom=voxel_size_angstrom,
        threads=threads,
    )
    is_main = int(os.environ.get("RANK", "0")) == 0
    from cryocaps.runtime import keep_freed_blocks

    keep_freed_blocks()  # the same large tensors every step: do not page them in afresh (1.16x for UCaps)
    with progress("Training", epochs * steps_per_epoch) as advance:
        result = train(config, progress=advance if is_main else None)
    if not is_main:
        return

    history = result.pop("history")
    write_run_json(
        out_dir,
        command=command_line(),
        inputs=result.pop("inputs"),
        outputs=[
            out_dir / name
            for name in (
                "config.json",
                "model.pt",
                "metrics.csv",
                "learning_curve.png",
                "checkpoint_last.pt",
            )
        ],
        parameters=config_dict(config)
        | {"world_size": result["world_size"], "paper_defaults": PAPER},
        seed=seed,
        timings={"total": result["seconds"], "per_step": result["seconds_per_step"]},
        results=result | {"epochs_recorded": len(history)},
    )
    if not quiet:
        rows = [[name, dice] for name, dice in result["best_dice"].items()]
        print_table(
            f"Best epoch {result['best_epoch']} of {result['epochs_done']}",  # short: no wrapping over the table
            ["class", "val Dice"],
            rows,
        )
        console.print(
            f"{result['steps_done']} steps, {result['seconds_per_step']:.2f} s/step, "
            f"{result['samples_per_second']:.1f} patches/s on {result['device']} x{result['world_size']}; "
            f"stopped: {result['stopped']}; model in {out_dir}"
        )
    if result["stopped"] in ("SIGINT", "SIGTERM"):
        console.print(f"[yellow]Stopped by {result['stopped']}; continue with --resume.[/]")
        raise typer.Exit(130 if result["stopped"] == "SIGINT" else 143)
