"""Whole tomograms: a saved model applied to MRC files, maps written beside each other.

:func:`segment_tomogram` applies a loaded model to one MRC file (or OME-Zarr image,
its level at the model's voxel size, read chunk by chunk) and writes
``<tomo>_labels.mrc`` (uint8 argmax; MRC mode 0), optionally
``<tomo>_probs.mrc`` (float16 volume stack (C, Z, Y, X), read back with
``read_tomogram(path, allow_stack=True)``) and ``<tomo>_score.mrc`` (float16,
highest foreground probability), slab by slab into memory-mapped files renamed
into place when complete (:class:`~cryocaps.inference.sinks.MrcMapsSink`); with
``out_format="zarr"`` the same maps as OME-Zarr images ``<tomo>_labels.zarr`` etc.
:func:`segment_files` is what ``cryocaps segment`` runs: many files, shards,
skipping finished ones, and the process set up through :mod:`cryocaps.runtime`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cryocaps.errors import CryocapsError
from cryocaps.inference.blend import (
    DEFAULT_BATCH_SIZE,
    ProbabilityPredictor,
    check_blending,
    sliding_window,
)
from cryocaps.inference.companions import (
    class_coverage,
    write_model_classes,
    write_model_thresholds,
)
from cryocaps.inference.sinks import MrcMapsSink
from cryocaps.inference.windows import count_windows, overlap_overhead, plan_windows, resolve_window
from cryocaps.io.files import check_folder
from cryocaps.io.layout import output_paths, tomogram_name
from cryocaps.io.pages import release_pages
from cryocaps.io.volumes import check_same_voxel_size, read_info, read_tomogram
from cryocaps.io.zarr_volumes import is_zarr_path, level_voxel_size
from cryocaps.preprocess import DEFAULT_CLIP_PERCENTILES, apply_normalization, normalization_stats
from cryocaps.runtime import configure_threads, resolve_device, tune_process_for, use_bf16

# --------------------------------------------------------------------------- what the model expects


def check_voxel_size(path, voxel_size_angstrom: float, config: dict, ignore: bool = False) -> None:
    """Refuse a tomogram whose voxel size is not the model's training voxel size.

    The rule is :func:`cryocaps.io.volumes.same_voxel_size` (the one tolerance of
    every stage); the message says how to resample, or how to go on anyway.
    """
    trained = config.get("voxel_size_angstrom")
    if ignore or not trained:
        return
    trained = float(trained)
    hint = (
        f"; resample it with `cryocaps preprocess {path} -o DIR --voxel-size-angstrom {trained:g}` "
        "and segment DIR's copy, or pass --ignore-voxel-size"
    )
    check_same_voxel_size(str(path), voxel_size_angstrom, "the model", trained, hint=hint)


OUT_FORMATS = {"mrc": ".mrc", "zarr": ".zarr"}


def out_suffix(out_format: str) -> str:
    """``.mrc`` or ``.zarr`` for ``--out-format``."""
    if out_format not in OUT_FORMATS:
        raise CryocapsError(f"--out-format {out_format!r}: use one of {', '.join(OUT_FORMATS)}")
    return OUT_FORMATS[out_format]


def input_level(path, config: dict, ignore_voxel_size: bool = False) -> float | None:
    """Voxel size of the scale level to read from an OME-Zarr input: the model's (None for MRC).

    A Zarr image without that level is refused (listing its levels) unless
    ``ignore_voxel_size``, which reads its finest level.
    """
    trained = config.get("voxel_size_angstrom")
    if not is_zarr_path(path) or not trained:
        return None
    return level_voxel_size(path, float(trained)) if ignore_voxel_size else float(trained)


def normalization_transform(data, config: dict) -> Callable[[np.ndarray], np.ndarray] | None:
    """The model's input normalisation, with statistics of the whole tomogram ``data``."""
    settings = config.get("normalization") or {}
    method = settings.get("method", "percentile_zscore")
    if method in ("none", None):
        return None
    if method != "percentile_zscore":
        raise CryocapsError(f"model config: unknown normalization method {method!r}")
    percentiles = tuple(settings.get("clip_percentiles", DEFAULT_CLIP_PERCENTILES))
    stats = normalization_stats(_SectionReader(data), percentiles)
    return lambda block: apply_normalization(block, stats)


class _SectionReader:
    """A volume seen through strided indexing, read one section at a time.

    ``normalization_stats`` takes a strided sample ``data[::s, ::s, ::s]``;
    through a memory map that touches about 1/s of the file's pages at once
    (hundreds of MB for a large tomogram). Reading section by section and
    dropping the pages after each keeps that to one section; the sample is the same.
    A volume that is not a memory map (an OME-Zarr image) is sliced directly: it
    decodes each chunk once and holds only the sample.
    """

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.size = data.size
        self.ndim = data.ndim
        self.dtype = data.dtype

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], slice)):
            return self.data[key]
        if not isinstance(
            self.data, np.ndarray
        ):  # section by section would decode chunks again and again
            return np.asarray(self.data[key])
        sections = []
        for z in range(*key[0].indices(self.shape[0])):
            sections.append(np.array(self.data[(z, *key[1:])]))
            release_pages(self.data)
        return np.stack(sections)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.data, dtype=dtype)


def _n_outputs(model, config: dict) -> int:
    options = config.get("options", {})
    return int(options.get("n_classes") or getattr(model, "n_classes", 0) or 0)


# --------------------------------------------------------------------------- one tomogram


def segment_tomogram(
    model,
    config: dict,
    tomogram_path,
    out_dir,
    *,
    patch_size=None,
    overlap=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    blending: str = "gaussian",
    probabilities: bool = False,
    score: bool = False,
    tta: bool = False,
    bf16: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    ignore_voxel_size: bool = False,
    out_format: str = "mrc",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Segment one tomogram with a loaded model and write its maps to ``out_dir``.

    Parameters
    ----------
    model, config : from :func:`cryocaps.modelfile.load_model`.
    tomogram_path : MRC file (memory-mapped, never read whole) or OME-Zarr image
        (its level at the model's voxel size, read chunk by chunk).
    out_format : ``mrc``, or ``zarr`` for OME-Zarr images ``<tomo>_labels.zarr`` etc.
    out_dir : gets ``<tomo>_labels.mrc`` (uint8, MRC mode 0, 0 = background),
        with ``probabilities`` ``<tomo>_probs.mrc`` (float16 (C, Z, Y, X) stack),
        with ``score`` ``<tomo>_score.mrc`` (float16 (Z, Y, X), highest
        foreground probability), and ``classes.csv`` from the model config.
        All keep the tomogram's voxel size and origin.
    patch_size, overlap : see :func:`~cryocaps.inference.windows.resolve_window`
        (None = defaults).
    bf16, device : as decided by :mod:`cryocaps.runtime` (see :func:`segment_files`).
    progress : called with the number of windows finished.

    Returns
    -------
    dict with ``tomogram``, ``outputs`` (name -> path), ``shape``, ``voxels``,
    ``patch_size``/``overlap`` (fitted, z y x), ``windows``, ``overhead``,
    ``seconds`` (normalisation, inference, total), ``voxels_per_second``,
    ``peak_rss_bytes``.
    """
    started = time.perf_counter()
    check_blending(blending)
    tomogram_path = Path(tomogram_path)
    level = input_level(tomogram_path, config, ignore_voxel_size)
    info = read_info(tomogram_path, level, with_data=True)
    check_voxel_size(tomogram_path, info.voxel_size_angstrom, config, ignore_voxel_size)
    size_multiple = int(getattr(model, "size_multiple", 1))
    patches, overlaps = resolve_window(config, size_multiple, patch_size, overlap)
    name = tomogram_name(tomogram_path)
    paths = output_paths(
        out_dir, name, probabilities=probabilities, score=score, suffix=out_suffix(out_format)
    )
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise CryocapsError(f"{existing[0]} exists; pass --overwrite to replace it")
    n_outputs = _n_outputs(model, config)
    if probabilities and n_outputs < 2:
        raise CryocapsError("model config: n_classes is missing; cannot size the probability map")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_model_classes(config, out_dir, overwrite=overwrite)

    tomogram = read_tomogram(tomogram_path, mmap=True, voxel_size_angstrom=level)
    try:
        transform = normalization_transform(tomogram.data, config)
        release_pages(tomogram.data)
        normalized = time.perf_counter()
        plans = plan_windows(tomogram.shape, patches, overlaps, size_multiple)
        sink = MrcMapsSink(
            paths,
            tomogram.shape,
            n_outputs,
            voxel_size_angstrom=tomogram.voxel_size_angstrom,
            origin_angstrom=tomogram.origin_angstrom,
            overwrite=overwrite,
        )
        with sink:
            sliding_window(
                tomogram.data,
                ProbabilityPredictor(model, tta=tta),
                patches,
                overlaps,
                size_multiple=size_multiple,
                blending=blending,
                batch_size=batch_size,
                device=device,
                bf16=bf16,
                transform=transform,
                sink=sink,
                progress=progress,
                z_carry_dtype="float16",  # halves the one buffer that grows with the area
            )
    finally:
        tomogram.close()
    seconds = {"started": started, "normalized": normalized, "finished": time.perf_counter()}
    summary = _tomogram_summary(tomogram_path, tomogram, paths, plans, seconds, tta=tta, bf16=bf16)
    return summary | class_coverage(paths["labels"], config)


def _tomogram_summary(path, tomogram, paths, plans, times: dict, **settings) -> dict:
    from cryocaps.runinfo import peak_rss_bytes

    started, normalized, finished = times["started"], times["normalized"], times["finished"]
    voxels = math.prod(tomogram.shape)
    return {
        "tomogram": str(path),
        "outputs": {key: str(p) for key, p in paths.items()},
        "shape": list(tomogram.shape),
        "voxels": voxels,
        "voxel_size_angstrom": tomogram.voxel_size_angstrom,
        "patch_size": [p.patch for p in plans],
        "overlap": [p.overlap for p in plans],
        "windows": math.prod(p.n_windows for p in plans),
        "overhead": round(overlap_overhead(plans), 4),
        **settings,
        "seconds": {
            "normalization": round(normalized - started, 4),
            "inference": round(finished - normalized, 4),
            "total": round(finished - started, 4),
        },
        "voxels_per_second": round(voxels / max(finished - started, 1e-9), 1),
        "peak_rss_bytes": peak_rss_bytes(),
    }


# --------------------------------------------------------------------------- many tomograms


def select_shard(paths: Sequence, index: int, count: int) -> list:
    """The ``index``-th of ``count`` disjoint shares of ``paths`` (0-based), deterministic.

    Inputs are sorted by absolute path and dealt round-robin, so every shard
    gets the same list whatever order the shell gave the files in, and the
    shards together cover every input exactly once.
    """
    if count < 1 or not 0 <= index < count:
        raise CryocapsError(f"--shard {index}/{count}: need 0 <= I < N")
    ordered = sorted(paths, key=lambda p: str(Path(p).resolve()))
    return ordered[index::count]


def unique_inputs(files: Sequence) -> list[Path]:
    """Drop repeated files; refuse two inputs that would write the same output names."""
    unique: dict[Path, Path] = {}
    names: dict[str, Path] = {}
    for path in map(Path, files):
        resolved = path.resolve()
        if resolved in unique:
            continue
        name = tomogram_name(path)
        if name in names:
            raise CryocapsError(
                f"{path} and {names[name]} have the same name {name!r}; their outputs would collide"
            )
        unique[resolved] = path
        names[name] = path
    return list(unique.values())


def _work_to_do(
    files, out_dir, *, probabilities: bool, score: bool, overwrite: bool, suffix: str = ".mrc"
):
    """(todo, skipped): todo holds (path, replace existing outputs) pairs."""
    todo, skipped = [], []
    for path in files:
        paths = output_paths(
            out_dir, tomogram_name(path), probabilities=probabilities, score=score, suffix=suffix
        )
        present = [p for p in paths.values() if p.exists()]
        if overwrite or not present:
            todo.append((path, overwrite))
        elif len(present) == len(paths):
            skipped.append(str(path))
        elif paths["labels"].exists():
            missing = ", ".join(p.name for p in paths.values() if not p.exists())
            raise CryocapsError(
                f"{paths['labels']} exists but {missing} does not; pass --overwrite to redo {path}"
            )
        else:  # extras left by an interrupted run: labels are renamed into place last
            todo.append((path, True))
    return todo, skipped


def segment_files(
    files: Sequence,
    model_path,
    out_dir,
    *,
    shard: tuple[int, int] | None = None,
    patch_size=None,
    overlap=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    blending: str = "gaussian",
    probabilities: bool = False,
    score: bool = False,
    tta: bool = False,
    bf16: bool | None = None,
    device: str = "cpu",
    threads: int | None = None,
    overwrite: bool = False,
    ignore_voxel_size: bool = False,
    out_format: str = "mrc",
    progress: Callable[..., None] | None = None,
) -> dict:
    """Segment many tomograms with a saved model (what ``cryocaps segment`` runs).

    Every input's voxel size is checked before any work starts. A tomogram
    whose requested outputs all exist is skipped unless ``overwrite``; one
    whose labels are missing is redone (extras left by an interrupted run are
    replaced, since labels are renamed into place last); one with labels but
    without a requested extra is refused. ``shard=(I, N)`` keeps the I-th
    (0-based) of N disjoint shares (:func:`select_shard`).

    The process is set up through :mod:`cryocaps.runtime`: ``device`` ("auto",
    "cpu", "cuda", "cuda:N") by ``resolve_device``, ``threads`` (None: this
    process's share of the CPUs) by ``configure_threads``, malloc by
    ``tune_process_for("segment", device)``, and ``bf16=None`` by ``use_bf16``
    (bfloat16 autocast on CPUs that compute it natively: measured 3x faster
    with 99.99% of labels unchanged). ``progress(n, info=..., total=...)``
    follows ``cli.common.progress``.

    Returns
    -------
    dict with ``tomograms`` (one :func:`segment_tomogram` result each),
    ``skipped`` (paths), ``model_name``, ``device``, ``bf16``, ``patch_size``
    and ``overlap`` (requested, z y x), ``thresholds`` (the companion
    ``pick_thresholds.csv`` written from the model, or None).
    """
    from cryocaps.modelfile import load_model

    check_blending(blending)
    check_folder(out_dir, "-o")
    if batch_size < 1:
        raise CryocapsError(f"--batch-size {batch_size}: must be at least 1")
    if threads is not None and threads < 1:
        raise CryocapsError(f"--threads {threads}: must be at least 1")
    files = unique_inputs(files)
    if shard is not None:
        files = select_shard(files, *shard)
    device = resolve_device(device)
    tune_process_for("segment", device)  # peak memory must not creep up with the windows
    configure_threads(threads)
    bf16 = use_bf16(device, bf16)
    model, config = load_model(model_path, device)
    size_multiple = int(getattr(model, "size_multiple", 1))
    patches, overlaps = resolve_window(config, size_multiple, patch_size, overlap)
    suffix = out_suffix(out_format)
    infos = {
        path: read_info(path, input_level(path, config, ignore_voxel_size), with_data=True)
        for path in files
    }
    for path, info in infos.items():
        check_voxel_size(path, info.voxel_size_angstrom, config, ignore_voxel_size)
    todo, skipped = _work_to_do(
        files, out_dir, probabilities=probabilities, score=score, overwrite=overwrite, suffix=suffix
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_model_classes(config, out_dir, overwrite=overwrite)
    thresholds_path = write_model_thresholds(config, out_dir, overwrite=overwrite)

    advance = progress or (lambda *args, **kwargs: None)
    windows = [
        count_windows(infos[path].shape, config, size_multiple, patches, overlaps)
        for path, _ in todo
    ]
    advance(0, total=sum(windows))
    results = []
    for number, (path, replace) in enumerate(todo, 1):
        label = f"{number}/{len(todo)} {path.name}"
        advance(0, info=label)
        result = segment_tomogram(
            model,
            config,
            path,
            out_dir,
            patch_size=patches,
            overlap=overlaps,
            batch_size=batch_size,
            blending=blending,
            probabilities=probabilities,
            score=score,
            tta=tta,
            bf16=bf16,
            device=device,
            overwrite=replace,
            ignore_voxel_size=ignore_voxel_size,
            out_format=out_format,
            progress=lambda n, label=label: advance(n, info=label),
        )
        results.append(result)
    return {
        "tomograms": results,
        "skipped": skipped,
        "model_name": config.get("model"),
        "device": device,
        "bf16": bf16,
        "patch_size": list(patches),
        "overlap": list(overlaps),
        "thresholds": str(thresholds_path) if thresholds_path else None,
    }
