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
    console,
    in_range,
    positive,
    progress,
    setup_logging,
)
from cryocaps.errors import CryocapsError
from cryocaps.training.config import (
    AUTO_ANNEAL_MIN_STEPS,
    AUTO_EMA_DECAY,
    AUTO_PATCH_CONTEXT,
    AUTO_PATCH_MIN,
    AUTO_PATCH_MULTIPLE,
    PAPER,
    VAL_TIME_SHARE,
    defaults,
    parse_ema,
)

DEFAULT = defaults()  # TrainConfig's: the one source of the defaults below and in the help


def _on_off(value: bool) -> str:
    return "on" if value else "off"


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
            help="Label map file or folder (repeat for more); <tomo>_labels.mrc or <tomo>.mrc, "
            "same shape and voxel size as the tomogram.",
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", "--output", "-o", help="Run folder for the model, checkpoints and metrics."
        ),
    ],
    classes: ClassesOption = DEFAULT["classes"],
    coords: Annotated[
        list[Path] | None,
        typer.Option(
            "--coords",
            help="Particle file(s) giving the patch centres (STAR/CSV/tbl). "
            "[default: connected components of the label maps]",
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Network: ucaps (3D-UCaps), ucaps-fast (3D-UCaps, one routing iteration) or unet "
            f"(DeepFinder). [default: {DEFAULT['model']}]",
        ),
    ] = DEFAULT["model"],
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
            callback=in_range(8),
            help=f"Patch side in voxels (paper: {PAPER['patch_size']}). "
            f"[default: {AUTO_PATCH_MIN}, "
            f"or 2 x the largest particle radius + {AUTO_PATCH_CONTEXT} rounded up to a multiple "
            f"of {AUTO_PATCH_MULTIPLE}]",
        ),
    ] = DEFAULT["patch_size"],
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            callback=in_range(1),
            help=f"Patches per step and process (paper: {PAPER['batch_size']}). "
            f"[default: {DEFAULT['batch_size']}]",
        ),
    ] = DEFAULT["batch_size"],
    epochs: Annotated[
        int,
        typer.Option(
            "--epochs",
            callback=in_range(1),
            help=f"Maximum number of epochs. [default: {DEFAULT['epochs']}]",
        ),
    ] = DEFAULT["epochs"],
    steps_per_epoch: Annotated[
        int,
        typer.Option(
            "--steps-per-epoch",
            callback=in_range(1),
            help=f"Optimiser steps per epoch. [default: {DEFAULT['steps_per_epoch']}]",
        ),
    ] = DEFAULT["steps_per_epoch"],
    lr: Annotated[
        float,
        typer.Option(
            "--lr",
            callback=positive,
            help=f"Adam learning rate (paper: {PAPER['lr']:g}). [default: {DEFAULT['lr']:g}]",
        ),
    ] = DEFAULT["lr"],
    lr_schedule: Annotated[
        str,
        typer.Option(
            "--lr-schedule",
            help="auto: cosine when the run makes >= "
            f"{AUTO_ANNEAL_MIN_STEPS} steps (known from --epochs, or projected after the first "
            "epoch under --max-minutes), else constant; none; cosine (3% warm-up, then down to "
            "1% of --lr by the end of the run: --epochs or --max-minutes, whichever ends it "
            "first); plateau (halve on a stalled val loss). "
            f"[default: {DEFAULT['lr_schedule']}]",
        ),
    ] = DEFAULT["lr_schedule"],
    ema: Annotated[
        str,
        typer.Option(
            "--ema",
            help="Validate and save an exponential moving average of the weights with this "
            "decay (e.g. 0.99: about the last 100 steps); 0 for the weights as trained; "
            f"auto: {AUTO_EMA_DECAY:g} while the rate anneals. "
            f"[default: {DEFAULT['ema']}]",
        ),
    ] = str(DEFAULT["ema"]),
    patience: Annotated[
        int,
        typer.Option(
            "--patience",
            callback=in_range(0),
            help="Stop after this many validations without a better score (--select-by; with f1 "
            "the held-out regions' validations count); 0 = never. "
            f"[default: {DEFAULT['patience']}]",
        ),
    ] = DEFAULT["patience"],
    select_by: Annotated[
        str,
        typer.Option(
            "--select-by",
            help="Keep the model of the epoch with the highest macro F1 of the picks in the "
            "held-out regions (f1; ties: less background called a class, then lower loss), the "
            "highest mean patch Dice (dice) or the lowest patch loss (loss, the paper's rule). "
            f"[default: {DEFAULT['select_by']}]",
        ),
    ] = DEFAULT["select_by"],
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            callback=in_range(0, 1),
            help="Hold out this fraction of each tomogram for validation: a slab at the end of "
            "its longer in-plane axis, full Z, kept half a patch away from every training patch "
            f"(paper: {PAPER['val_fraction']} of the particles). "
            f"[default: {DEFAULT['val_fraction']}]",
        ),
    ] = DEFAULT["val_fraction"],
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
            help="Cross-validation fold k/K, e.g. 2/6: the k-th of K slabs along each tomogram's "
            "longer in-plane axis is held out.",
        ),
    ] = DEFAULT["fold"],
    val_every: Annotated[
        int | None,
        typer.Option(
            "--val-every",
            help="Segment, pick and score the held-out regions every N epochs (and at the last "
            f"one). [default: as often as keeps it to about {VAL_TIME_SHARE:.0%} of the "
            "training time, measured]",
            show_default=False,
        ),
    ] = DEFAULT["val_every"],
    max_val_voxels: Annotated[
        int,
        typer.Option(
            "--max-val-voxels",
            help="Segment at most about this many held-out voxels per validation (larger regions "
            f"are cropped, centred). [default: {DEFAULT['max_val_voxels']}]",
        ),
    ] = DEFAULT["max_val_voxels"],
    background_fraction: Annotated[
        float,
        typer.Option(
            "--background-fraction",
            callback=in_range(0, 1),
            help="Fraction of patches placed off the particles (background). "
            f"[default: {DEFAULT['background_fraction']}]",
        ),
    ] = DEFAULT["background_fraction"],
    hard_negative_fraction: Annotated[
        float,
        typer.Option(
            "--hard-negatives",
            callback=in_range(0, 1),
            help="Share of the background patches (those not on mined false positives) centred "
            "on label-free places of high contrast (membranes, gold, carbon edges) instead of "
            "at random; 0 = all random. "
            f"[default: {DEFAULT['hard_negative_fraction']}]",
        ),
    ] = DEFAULT["hard_negative_fraction"],
    mined_negative_fraction: Annotated[
        float,
        typer.Option(
            "--mined-negatives",
            help="Share of the background patches centred on the network's own false positives: "
            "at the end of every epoch it segments a few random training windows, and voxels it "
            "calls a class where the label map says background become patch centres (the rest "
            "follow --hard-negatives); 0 = off. "
            f"[default: {DEFAULT['mined_negative_fraction']}]",
        ),
    ] = DEFAULT["mined_negative_fraction"],
    unannotated: Annotated[
        str,
        typer.Option(
            "--unannotated",
            help="For partly annotated label maps. auto: once 40% of the run and 200 steps are "
            "done (a shorter run does not look), the network segments and picks each "
            "training tomogram; a class whose label maps miss many of its picks (annotated share "
            "estimated below 0.7) is taken as partly annotated, and places it picked where its "
            "maps say background become unknown for the rest of the run (never taught as "
            "background, not counted as false in validation, and those classes get no score "
            "thresholds). keep: "
            "train on the label maps as they are. The maps on disk are never changed. "
            f"[default: {DEFAULT['unannotated']}]",
        ),
    ] = DEFAULT["unannotated"],
    jitter_voxels: Annotated[
        int | None,
        typer.Option(
            "--jitter-voxels",
            callback=in_range(0),
            help="Random shift of particle patches, voxels per axis. [default: patch size / 4]",
        ),
    ] = DEFAULT["jitter_voxels"],
    rot90: Annotated[
        bool,
        typer.Option(
            "--rot90",
            help="Also rotate by 90° about Z (moves the missing wedge). "
            f"[default: {_on_off(DEFAULT['rot90'])}]",
        ),
    ] = DEFAULT["rot90"],
    mirror: Annotated[
        bool,
        typer.Option(
            "--mirror",
            help="Also mirror patches (keeps the wedge, flips particle handedness). "
            f"[default: {_on_off(DEFAULT['mirror'])}]",
        ),
    ] = DEFAULT["mirror"],
    intensity_augmentation: Annotated[
        bool,
        typer.Option(
            "--intensity-augmentation/--no-intensity-augmentation",
            help="Random intensity scale, offset and noise. "
            f"[default: {_on_off(DEFAULT['intensity_augmentation'])}]",
        ),
    ] = DEFAULT["intensity_augmentation"],
    max_val_patches: Annotated[
        int,
        typer.Option(
            "--max-val-patches",
            callback=in_range(1),
            help="At most this many validation patches per epoch. "
            f"[default: {DEFAULT['max_val_patches']}]",
        ),
    ] = DEFAULT["max_val_patches"],
    class_weights: Annotated[
        bool,
        typer.Option(
            "--class-weights/--no-class-weights",
            help="Weight the cross-entropy by inverse class frequency. "
            f"[default: {_on_off(DEFAULT['class_weights'])}]",
        ),
    ] = DEFAULT["class_weights"],
    class_weight_power: Annotated[
        float,
        typer.Option(
            "--class-weight-power",
            help="Class weights are (median frequency / frequency) to this power: 1 balances "
            "the classes fully, 0.5 (the square root) keeps more of their priors, so the "
            "background, most of a tomogram, is not weighted down as far. "
            f"[default: {DEFAULT['class_weight_power']}]",
        ),
    ] = DEFAULT["class_weight_power"],
    max_minutes: Annotated[
        float | None,
        typer.Option(
            "--max-minutes",
            callback=positive,
            help="Wall-time budget in minutes: the epoch running out of time ends early, is "
            "validated and checkpointed, and training stops.",
        ),
    ] = DEFAULT["max_minutes"],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in RUN_DIR from checkpoint_last.pt.")
    ] = DEFAULT["resume"],
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bfloat16 autocast on CPU (measured 2.7x more steps per minute for the U-Net). "
            "[default: on where the CPU has native bfloat16 (AVX512-BF16 or AMX), else off; "
            "CUDA always uses float16 AMP]",
            show_default=False,
        ),
    ] = DEFAULT["bf16"],
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            callback=in_range(1),
            help="Torch threads per process, at least 1 (as in segment). "
            "[default: the CPUs available / processes on this node]",
        ),
    ] = DEFAULT["threads"],
    voxel_size_angstrom: VoxelSize = DEFAULT["voxel_size_angstrom"],
    seed: Seed = DEFAULT["seed"],
    device: Device = DEFAULT["device"],
    overwrite: Overwrite = DEFAULT["overwrite"],
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    setup_logging(quiet, verbose)
    from cryocaps.training import TrainConfig, train

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
        ema=parse_ema(ema),
        patience=patience,
        select_by=select_by,
        val_fraction=val_fraction,
        val_tomograms=val_tomograms or [],
        fold=fold,
        val_every=val_every,
        max_val_voxels=max_val_voxels,
        background_fraction=background_fraction,
        hard_negative_fraction=hard_negative_fraction,
        mined_negative_fraction=mined_negative_fraction,
        unannotated=unannotated,
        jitter_voxels=jitter_voxels,
        rot90=rot90,
        mirror=mirror,
        intensity_augmentation=intensity_augmentation,
        max_val_patches=max_val_patches,
        class_weights=class_weights,
        class_weight_power=class_weight_power,
        max_minutes=max_minutes,
        resume=resume,
        overwrite=overwrite,
        seed=seed,
        device=device,
        bf16=bf16,
        voxel_size_angstrom=voxel_size_angstrom,
        threads=threads,
    )
    with progress("Training", epochs * steps_per_epoch) as advance:
        result = train(config, progress=advance)  # called on rank 0 only
    if result["rank"] != 0:  # under torchrun, rank 0 writes run.json and reports
        return
    from cryocaps.cli.train_report import print_summary, write_train_run_json

    write_train_run_json(config, result)
    if not quiet:
        print_summary(result, out_dir)
    if result["stopped"] in ("SIGINT", "SIGTERM"):
        console.print(f"[yellow]Stopped by {result['stopped']}; continue with --resume.[/]")
        raise typer.Exit(130 if result["stopped"] == "SIGINT" else 143)
