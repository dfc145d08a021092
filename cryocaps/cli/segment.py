"""Segment tomograms with a trained model (sliding window, bounded memory).

Writes OUT_DIR/<tomo>_labels.mrc (uint8, 0 = background; .zarr OME-Zarr images with
--out-format zarr), with --probabilities
OUT_DIR/<tomo>_probs.mrc (float16 volume stack (C, Z, Y, X), C = classes incl.
background), with --score OUT_DIR/<tomo>_score.mrc (float16, highest foreground
probability), plus OUT_DIR/classes.csv (from the model), OUT_DIR/pick_thresholds.csv
(the per-class score thresholds training calibrated on its held-out region, which
cluster-picks uses by default) and OUT_DIR/run.json (timings, voxels/s, peak
memory). Tomograms whose outputs already exist are skipped unless --overwrite.
The input is memory-mapped and written slab by slab: memory does not grow with
the tomogram's depth.

Many tomograms on a cluster: --shard I/N runs the I-th of N disjoint shares
(I from 0). In a SLURM array, `--shard $SLURM_ARRAY_TASK_ID/N` works for both
--array=0-(N-1) and --array=1-N: the index is counted from the array's first
task, and the array must have N tasks. Each shard writes run_shard-I-of-N.json.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Annotated

import typer

from cryocaps.cli.common import (
    Device,
    OutDir,
    Overwrite,
    Quiet,
    Verbose,
    collect_mrc_files,
    command_line,
    console,
    in_range,
    log,
    print_table,
    progress,
    setup_logging,
)
from cryocaps.errors import CryocapsError


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int] | None:
    """``"I/N"`` -> (0-based index, N); SLURM array ids are counted from the array's first task."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", text)
    if not match:
        raise CryocapsError(f"--shard {text!r}: expected I/N, e.g. 0/4 (I from 0 to N-1)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise CryocapsError(f"--shard {text}: N must be at least 1")
    task_id, task_min, task_max = (
        environ.get(f"SLURM_ARRAY_TASK_{k}") for k in ("ID", "MIN", "MAX")
    )
    if (
        task_id is not None
        and task_min is not None
        and task_max is not None
        and str(index) == task_id.strip()
    ):
        step = _slurm_number(environ, "SLURM_ARRAY_TASK_STEP", minimum=1)
        task_min = _slurm_number(environ, "SLURM_ARRAY_TASK_MIN", minimum=0)
        task_max = _slurm_number(environ, "SLURM_ARRAY_TASK_MAX", minimum=task_min)
        n_tasks = (task_max - task_min) // step + 1
        if n_tasks != count:
            raise CryocapsError(
                f"--shard {text}: the SLURM array has {n_tasks} tasks ({task_min}-{task_max}) "
                f"but N is {count}; "
                f"use --array=0-{count - 1} or make N match"
            )
        index = (index - task_min) // step
    if not 0 <= index < count:
        raise CryocapsError(
            f"--shard {text}: I must be from 0 to {count - 1} (shards are counted from 0)"
        )
    return index, count


def _slurm_number(environ, name: str, minimum: int) -> int:
    """A SLURM array variable as an integer of at least ``minimum`` (a step left empty is 1)."""
    text = (environ.get(name) or "").strip()
    if name == "SLURM_ARRAY_TASK_STEP" and not text:
        return 1
    try:
        value = int(text)
    except ValueError:
        raise CryocapsError(f"{name}={text!r}: not an integer (set by SLURM for --shard)") from None
    if value < minimum:
        raise CryocapsError(
            f"{name}={value}: must be at least {minimum} (set by SLURM for --shard)"
        )
    return value


def command(
    tomograms: Annotated[
        list[Path],
        typer.Argument(
            help="Tomograms to segment: MRC files, OME-Zarr .zarr images (the level at the model's "
            "voxel size), folders of them, or a copick config.json[:TYPE@SPACING] (that tomogram "
            "of every run).",
            show_default=False,
        ),
    ],
    model_path: Annotated[
        Path,
        typer.Option(
            "--model",
            "-m",
            help="Trained model folder (config.json + model.pt).",
            show_default=False,
        ),
    ],
    out_dir: OutDir,
    patch_size: Annotated[
        int | None,
        typer.Option(
            "--patch-size",
            callback=in_range(1),
            help="Window side in voxels (a multiple of the model's size multiple: unet 4, "
            "ucaps 8); shrunk to fit small volumes. "
            "[default: the larger of 96 and the training patch]",
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        int | None,
        typer.Option(
            "--overlap",
            callback=in_range(0),
            help="Voxels shared by neighbouring windows, below the patch size (the paper used 25). "
            "[default: 16]",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", callback=in_range(1), help="Windows per forward pass. [default: 1]"
        ),
    ] = 1,
    blending: Annotated[
        str,
        typer.Option("--blending", help="Window blending: gaussian or mean. [default: gaussian]"),
    ] = "gaussian",
    probabilities: Annotated[
        bool,
        typer.Option(
            "--probabilities",
            help="Also write <tomo>_probs.mrc, float16 (C, Z, Y, X). [default: off]",
        ),
    ] = False,
    score: Annotated[
        bool,
        typer.Option(
            "--score",
            help="Also write <tomo>_score.mrc, highest foreground probability. [default: off]",
        ),
    ] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help="Average 4 orientations (identity, 180° about Z, Y, X: keep wedge and hand); "
            "4x slower. [default: off]",
        ),
    ] = False,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bfloat16 autocast on CPU (3x faster here, 99.99% of labels unchanged). "
            "[default: on where the CPU has native bfloat16 (AVX512-BF16 or AMX), else off]",
            show_default=False,
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="Run only share I of N (I from 0 to N-1), e.g. --shard $SLURM_ARRAY_TASK_ID/8. "
            "[default: all]",
            show_default=False,
        ),
    ] = None,
    ignore_voxel_size: Annotated[
        bool,
        typer.Option(
            "--ignore-voxel-size",
            help="Segment even if the voxel size is not the model's training voxel size "
            "(they must agree within 1%, as in every command). [default: off]",
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            callback=in_range(1),
            help="CPU threads for torch, at least 1 (as in train). [default: the CPUs available]",
            show_default=False,
        ),
    ] = None,
    out_format: Annotated[
        str,
        typer.Option(
            "--out-format",
            help="mrc, or zarr: the maps as one-level OME-Zarr images <tomo>_labels.zarr etc. "
            "[default: mrc]",
        ),
    ] = "mrc",
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    setup_logging(quiet, verbose)
    started = time.time()
    shard_index = parse_shard(shard)
    files = collect_mrc_files(tomograms, "TOMOGRAMS")

    from cryocaps.inference import segment_files
    from cryocaps.runinfo import peak_rss_bytes, write_run_json

    with progress("Segmenting", None) as advance:
        summary = segment_files(
            files,
            model_path,
            out_dir,
            shard=shard_index,
            patch_size=patch_size,
            overlap=overlap,
            batch_size=batch_size,
            blending=blending,
            probabilities=probabilities,
            score=score,
            tta=tta,
            bf16=bf16,
            device=device,
            threads=threads,
            overwrite=overwrite,
            ignore_voxel_size=ignore_voxel_size,
            out_format=out_format,
            progress=advance,
        )
    results, skipped = summary["tomograms"], summary["skipped"]
    _warn_oversegmented(results)
    if skipped:
        console.print(
            f"Skipped {len(skipped)} tomogram(s) already segmented in {out_dir} "
            "(--overwrite to redo)."
        )
    seconds = sum(r["seconds"]["total"] for r in results)
    voxels = sum(r["voxels"] for r in results)
    run_name = (
        "run.json"
        if shard_index is None
        else f"run_shard-{shard_index[0]}-of-{shard_index[1]}.json"
    )
    write_run_json(
        out_dir,
        command=command_line(),
        inputs=[r["tomogram"] for r in results],
        outputs=[p for r in results for p in r["outputs"].values()]
        + ([summary["thresholds"]] if summary["thresholds"] else []),
        parameters={
            "model": str(model_path),
            "model_name": summary["model_name"],
            "patch_size": summary["patch_size"],
            "overlap": summary["overlap"],
            "batch_size": batch_size,
            "blending": blending,
            "tta": tta,
            "bf16": summary["bf16"],
            "device": summary["device"],
            "shard": list(shard_index) if shard_index else None,
        },
        timings={"segment": round(seconds, 3), "wall": round(time.time() - started, 3)},
        results={
            "tomograms": results,
            "skipped": skipped,
            "voxels_per_second": round(voxels / seconds, 1) if seconds else None,
            "peak_rss_bytes": peak_rss_bytes(),
        },
        started=started,
        name=run_name,
    )
    _print_summary(results, skipped, out_dir)


def _warn_oversegmented(results: list[dict]) -> None:
    """One warning line per class that covers far more of a tomogram than it could."""
    from cryocaps.classes import oversegmentation_message

    for result in results:
        for found in result.get("oversegmented", []):
            log.warning(oversegmentation_message(_shown_name(result["tomogram"]), found))


def _print_summary(results: list[dict], skipped: list, out_dir: Path) -> None:
    """One row per segmented tomogram: shape, seconds, Mvoxel/s."""
    if results:
        rows = [
            [
                _shown_name(r["tomogram"]),
                "x".join(map(str, r["shape"])),
                r["seconds"]["total"],
                r["voxels_per_second"] / 1e6,
            ]
            for r in results
        ]
        print_table(
            f"Segmented into {out_dir}",
            ["tomogram", "shape (z x y x x)", "seconds", "Mvoxel/s"],
            rows,
        )
    elif not skipped:
        console.print("No tomograms to segment in this shard.")


def _shown_name(path: str) -> str:
    """The input's file name; for a .zarr image its tomogram name (copick images are all
    TYPE.zarr)."""
    from cryocaps.io.layout import tomogram_name

    return tomogram_name(path) if path.rstrip("/").endswith(".zarr") else Path(path).name
