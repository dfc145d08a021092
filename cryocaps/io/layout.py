"""Names on disk: which files a command writes, and how it finds and pairs inputs.

One place for the file-naming rules every stage shares:

- a tomogram's name is its file name without the MRC or ``.zarr`` suffix (``TS_01.mrc``,
  ``TS_01.zarr`` → ``TS_01``); a copick tomogram is named by its run
  (``ExperimentRuns/TS_01/VoxelSpacing10.000/wbp.zarr`` → ``TS_01``);
- ``segment`` writes ``<tomo>_labels.mrc`` (+ ``_probs``, ``_score``) and the
  name behind such an output drops the suffix again (``TS_01_labels`` → ``TS_01``);
- a folder given for volumes means every MRC file and ``.zarr`` image in it (sorted); a
  ``.zarr`` folder is one volume; a copick ``config.json[:TYPE][@SPACING]`` means that
  tomogram of every run;
- a class table ``classes.csv`` is looked for beside label maps, or one folder up;
- label maps pair with tomograms by that name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryocaps.errors import CryocapsError
from cryocaps.io.copick_project import copick_run_of, parse_tomogram_spec, project_tomograms
from cryocaps.io.zarr_volumes import ZARR_SUFFIX, is_zarr_path

log = logging.getLogger(__name__)

MRC_SUFFIXES = (".mrc", ".rec", ".map", ".mrcs", ".st", ".ali")
OUTPUT_SUFFIXES = ("_labels", "_probs", "_score")
CLASS_TABLE_NAME = "classes.csv"
THRESHOLDS_NAME = "pick_thresholds.csv"


def tomogram_name(path: str | os.PathLike) -> str:
    """Name used to match a tomogram with particles: the file name without MRC/.zarr suffix.

    A copick tomogram (``ExperimentRuns/RUN/VoxelSpacing*/TYPE.zarr``) is named by its run.
    """
    name = Path(path).name
    if is_zarr_path(name):
        return copick_run_of(path) or name[: -len(ZARR_SUFFIX)]
    for suffix in MRC_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def base_tomogram_name(name: str) -> str:
    """Tomogram name behind an output map: ``TS_01_labels`` -> ``TS_01``."""
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def map_tomogram_name(path: str | os.PathLike) -> str:
    """Tomogram a file belongs to: ``seg/TS_01_labels.mrc`` and ``TS_01.mrc`` -> ``TS_01``."""
    return base_tomogram_name(tomogram_name(path))


def output_paths(
    out_dir: str | os.PathLike,
    name: str,
    *,
    probabilities: bool = False,
    score: bool = False,
    suffix: str = ".mrc",
) -> dict[str, Path]:
    """The files segment writes for tomogram ``name``: labels, and probs/score when asked.

    ``suffix`` is ``.mrc`` or ``.zarr`` (OME-Zarr images, ``--out-format zarr``).
    """
    out_dir = Path(out_dir)
    paths = {"labels": out_dir / f"{name}_labels{suffix}"}
    if probabilities:
        paths["probabilities"] = out_dir / f"{name}_probs{suffix}"
    if score:
        paths["score"] = out_dir / f"{name}_score{suffix}"
    return paths


def companion_path(label_path: str | os.PathLike, kind: str) -> Path | None:
    """``<tomo>_probs.mrc`` / ``<tomo>_score.mrc`` beside ``<tomo>_labels.mrc`` (or ``.zarr``),
    if present."""
    label_path = Path(label_path)
    candidate = label_path.with_name(f"{map_tomogram_name(label_path)}_{kind}{label_path.suffix}")
    return candidate if is_volume_file(candidate) and candidate != label_path else None


def is_volume_file(path: Path) -> bool:
    """An MRC file or an OME-Zarr image (a ``.zarr`` folder)."""
    if is_zarr_path(path):
        return path.is_dir()
    return path.is_file() and path.suffix.lower() in MRC_SUFFIXES


def expand_volume_paths(
    paths: Iterable[str | os.PathLike], flag: str, *, skip_outputs: bool = False
) -> list[Path]:
    """Volumes given, each folder replaced by its MRC files and ``.zarr`` images (sorted).

    A ``.zarr`` folder is one volume; a copick ``config.json[:TYPE][@SPACING]`` is
    that tomogram of every run. Every path must exist. ``skip_outputs`` leaves out
    a folder's ``*_labels``/``_probs``/``_score`` maps (a tomogram folder that also
    holds segmentations).
    """
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        project = parse_tomogram_spec(text)
        if project is not None:
            files.extend(project_tomograms(*project, flag=flag))
        elif is_zarr_path(path) and path.is_dir():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if is_volume_file(p)
                and not (skip_outputs and tomogram_name(p).endswith(OUTPUT_SUFFIXES))
            )
            if not found:
                raise CryocapsError(
                    f"{flag} {path}: folder holds no .mrc/.rec/.map files or .zarr images"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CryocapsError(f"{flag} {path}: no such file or folder")
    if not files:
        raise CryocapsError(f"{flag}: no files given")
    return files


def index_by_tomogram(paths: Iterable[str | os.PathLike], flag: str) -> dict[str, Path]:
    """``{tomogram name: path}``; two files for one tomogram are refused."""
    table: dict[str, Path] = {}
    for path in map(Path, paths):
        name = map_tomogram_name(path)
        if name in table and table[name] != path:
            raise CryocapsError(f"{flag}: two files for tomogram {name}: {table[name]} and {path}")
        table[name] = path
    return table


def match_label_maps(
    tomograms: Sequence[Path], labels: Sequence[Path], skip_unlabelled: bool = False
) -> list[tuple[Path, Path]]:
    """Pair each tomogram with its label map (``<tomo>_labels.mrc`` or ``<tomo>.mrc``).

    A tomogram without one is refused, or with ``skip_unlabelled`` left out with a warning
    (a copick project's runs that have no picks).
    """
    by_name = index_by_tomogram(labels, "--labels")
    pairs = []
    seen: dict[str, Path] = {}
    for tomogram in map(Path, tomograms):
        name = tomogram_name(tomogram)
        if name in seen:
            raise CryocapsError(
                f"--tomograms: two tomograms named {name}: {seen[name]} and {tomogram}"
            )
        seen[name] = tomogram
        if name not in by_name:
            if skip_unlabelled:
                log.warning("tomogram %s has no label map among --labels; not trained on", name)
                continue
            raise CryocapsError(
                f"--tomograms {tomogram}: no label map {name}_labels.mrc or {name}.mrc "
                "among --labels"
            )
        pairs.append((tomogram, by_name[name]))
    if not pairs:
        raise CryocapsError("--tomograms: no tomogram has a label map among --labels")
    unused = sorted(set(by_name) - set(seen))
    if unused:
        log.warning("label maps without a tomogram ignored: %s", ", ".join(unused))
    return pairs


def find_class_table_beside(paths: Sequence[str | os.PathLike]) -> Path | None:
    """``classes.csv`` in the folder of one of ``paths`` (or its parent), if there is one."""
    for folder in dict.fromkeys(Path(p).resolve().parent for p in paths):
        for candidate in (folder / CLASS_TABLE_NAME, folder.parent / CLASS_TABLE_NAME):
            if candidate.is_file():
                return candidate
    return None
