"""copick picks: ``RUN/Picks/USER_SESSION_OBJECT.json`` of a copick project, read and written.

A picks file holds points ``{"location": {"x", "y", "z"}, "transformation_": 4x4,
"score", "instance_id"}``. ``location`` is in Å from the centre of voxel 0 of the
run's tomograms (voxel ``i`` at ``i * spacing`` Å), so at the run's voxel spacing
``voxel = (location + transformation_[:3, 3]) / spacing`` (the translation is a
shift in Å added to the location, as copick's ``full_positions``). The 3x3 part is
the rotation from particle to tomogram coordinates, the matrix of RELION's
(rot, tilt, psi): ``O = Rotation.from_euler("ZYZ", [rot, tilt, psi]).inv()`` (see
:mod:`cryocaps.io.formats.angles`).

Reading: every picks file of the project's runs, filtered by user, session and
objects; ``tomo`` = run name, ``class_name`` = object name. Writing: one file per
run and object as a new user/session of an existing project, in the overlay root;
existing picks of that user/session are refused unless ``overwrite`` (and then
replaced: the session ends up holding exactly the table).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from cryocaps.errors import CryocapsError
from cryocaps.io.copick_project import (
    CopickProject,
    CopickSelection,
    PicksFile,
    check_copick_name,
    pickable_object,
)
from cryocaps.io.formats.angles import relion_angles, relion_orientation
from cryocaps.io.formats.context import ANGLE_COLUMNS, XYZ, Geometry, canonical_frame, table_angles

log = logging.getLogger(__name__)

ROTATION_TOLERANCE = 1e-3  # |R R^T - I| and |det R - 1| above this are not rotations


def _run_spacing(
    project: CopickProject, run: str, geometry: Geometry, selection: CopickSelection, where
) -> float:
    """Voxel spacing (Å) of ``run``'s positions: ``--voxel-size-angstrom``, a tomogram given,
    or the run's one."""
    from cryocaps.io.volumes import check_same_voxel_size

    info = geometry.tomogram(run)
    requested = selection.voxel_size_angstrom
    if info is not None and requested is not None:
        check_same_voxel_size(
            f"{where}: run {run!r}: --voxel-size-angstrom",
            requested,
            f"tomogram {info.name}",
            info.voxel_size_angstrom,
        )
    if info is not None and requested is None:
        return info.voxel_size_angstrom  # voxels of the tomogram given for this run
    return project.spacing(run, requested, where)


def _load_points(picks: PicksFile) -> list[dict]:
    try:
        text = picks.path.read_text()
    except OSError as error:
        raise CryocapsError(f"{picks.path}: cannot read ({error.strerror or error})") from None
    if not text.strip():
        raise CryocapsError(f"{picks.path}: empty copick picks file (not JSON)")
    try:
        content = json.loads(text)
    except ValueError as error:
        raise CryocapsError(f"{picks.path}: not a copick picks file ({error})") from None
    points = content.get("points") if isinstance(content, dict) else None
    if points is None:
        return []  # copick writes "points": null for a file with no picks yet
    if not isinstance(points, list):
        raise CryocapsError(f"{picks.path}: 'points' is not a list")
    unit = content.get("unit", "angstrom")
    if unit != "angstrom":
        raise CryocapsError(f"{picks.path}: picks in unit {unit!r}; copick picks are in 'angstrom'")
    return points


def _points_arrays(points: list[dict], path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 3) locations Å, (N, 4, 4) transforms, (N,) scores of a picks file's points."""
    n = len(points)
    locations, transforms, scores = np.zeros((n, 3)), np.tile(np.eye(4), (n, 1, 1)), np.ones(n)
    for i, point in enumerate(points):
        try:
            location = point["location"]
            locations[i] = [float(location["x"]), float(location["y"]), float(location["z"])]
            if point.get("transformation_") is not None:
                transforms[i] = np.asarray(point["transformation_"], dtype=float).reshape(4, 4)
            if point.get("score") is not None:
                scores[i] = float(point["score"])
        except (KeyError, TypeError, ValueError):
            raise CryocapsError(
                f"{path}: point {i} is not a copick point (location x, y, z; 4x4 transformation_)"
            ) from None
    if not (np.isfinite(locations).all() and np.isfinite(transforms).all()):
        raise CryocapsError(f"{path}: non-finite location or transformation_ values")
    _check_rotations(transforms[:, :3, :3], path)
    return locations, transforms, scores


def _check_rotations(matrices: np.ndarray, path) -> None:
    identity = np.eye(3)
    orthogonal = np.abs(matrices @ np.swapaxes(matrices, 1, 2) - identity).max(axis=(1, 2))
    determinant = np.linalg.det(matrices) if len(matrices) else np.zeros(0)
    bad = np.flatnonzero(
        (orthogonal > ROTATION_TOLERANCE) | (np.abs(determinant - 1) > ROTATION_TOLERANCE)
    )
    if bad.size:
        raise CryocapsError(
            f"{path}: transformation_ of point {int(bad[0])} is not a rotation (plus shift); "
            f"{bad.size} such point(s)"
        )


def read_copick(path, geometry: Geometry) -> pd.DataFrame:
    """Every pick of the project (or the selection's user/session/objects) as the canonical
    table."""
    selection = geometry.copick or CopickSelection()
    project = CopickProject(path)
    files = project.picks_files(selection)
    frames = []
    for picks in files:
        points = _load_points(picks)
        if not points:
            continue
        locations, transforms, scores = _points_arrays(points, picks.path)
        spacing = _run_spacing(project, picks.run, geometry, selection, picks.path)
        positions = (locations + transforms[:, :3, 3]) / spacing
        angles = relion_angles(Rotation.from_matrix(transforms[:, :3, :3]))
        frames.append(
            canonical_frame(
                [picks.run] * len(points),
                [picks.object_name] * len(points),
                positions,
                scores,
                np.atleast_2d(angles),
            )
        )
    if not frames:
        log.warning("%s: no copick picks%s", path, _describe(selection))
        return canonical_frame([], [], np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)))
    return pd.concat(frames, ignore_index=True)


def _describe(selection: CopickSelection) -> str:
    parts = [
        f"{key} {value}"
        for key, value in (
            ("user", selection.user),
            ("session", selection.session),
            ("objects", ",".join(selection.objects) if selection.objects else None),
        )
        if value
    ]
    return f" of {', '.join(parts)}" if parts else ""


def write_copick(
    table: pd.DataFrame, path, geometry: Geometry, overwrite: bool = False
) -> list[Path]:
    """Write the table into the copick project ``path`` as user/session; returns the files written.

    Runs (``tomo``) must exist in the project, and objects (``class_name``) too,
    unless the geometry's class table adds them (as pickable objects, to the
    config). Every file is written to a temporary name first and renamed only
    when all are written, so a refused or failed write leaves the project as it was.
    """
    selection = geometry.copick or CopickSelection()
    if selection.user is None or selection.session is None:
        raise CryocapsError("writing copick picks needs --copick-user and --copick-session")
    user = check_copick_name(selection.user, "--copick-user")
    session = check_copick_name(selection.session, "--copick-session")
    project = CopickProject(path)
    runs = set(project.runs())
    unknown = sorted(set(table["tomo"].astype(str)) - runs)
    if unknown:
        raise CryocapsError(
            f"{path}: the copick project has no run(s) {', '.join(unknown)} "
            f"(runs: {', '.join(sorted(runs)) or 'none'})"
        )
    new_config = project.with_classes(geometry.classes) if geometry.classes is not None else None
    if new_config is not None:
        project.objects = [pickable_object(entry, path) for entry in new_config["pickable_objects"]]
    for name in dict.fromkeys(table["class_name"].astype(str)):
        project.object(name)
    existing = project.picks_files(CopickSelection(user=user, session=session))
    if existing and not overwrite:
        raise CryocapsError(
            f"{existing[0].path} exists: user {user} already has picks in session {session}; "
            "pass --overwrite to replace them"
        )
    contents = _picks_contents(table, project, geometry, selection, user, session, path)
    if new_config is not None:
        contents[Path(path)] = new_config
    written = _write_all(contents)
    stale = [
        p.path
        for p in existing
        if p.path not in written and p.path.is_relative_to(project.overlay_root)
    ]
    for old in stale:  # the session is replaced as a whole (files of the static root stay)
        old.unlink()
    return written


def _picks_contents(
    table,
    project: CopickProject,
    geometry: Geometry,
    selection: CopickSelection,
    user: str,
    session: str,
    where,
) -> dict[Path, dict]:
    """``{picks file: JSON content}`` for each run and object of the table."""
    rotations = relion_orientation(table_angles(table)).as_matrix().reshape(-1, 3, 3)
    oriented = set(ANGLE_COLUMNS) <= set(
        table.columns
    )  # picks from a label map have no orientation
    scores = (
        table["score"].to_numpy(dtype=float) if "score" in table else np.full(len(table), np.nan)
    )
    positions = table[XYZ].to_numpy(dtype=float)
    contents = {}
    groups = table.groupby(
        [table["tomo"].astype(str), table["class_name"].astype(str)], sort=True
    ).indices
    for (run, object_name), rows in groups.items():
        spacing = _run_spacing(project, run, geometry, selection, where)
        points = []
        for row in rows:
            transform = np.eye(4)
            transform[:3, :3] = rotations[row]
            location = positions[row] * spacing
            score = float(scores[row]) if np.isfinite(scores[row]) else 1.0  # copick's "no score"
            points.append(
                {
                    "location": {
                        "x": float(location[0]),
                        "y": float(location[1]),
                        "z": float(location[2]),
                    },
                    "transformation_": transform.tolist(),
                    "instance_id": 0,
                    "score": score,
                }
            )
        contents[project.picks_path(run, user, session, object_name)] = {
            "pickable_object_name": object_name,
            "user_id": user,
            "session_id": session,
            "run_name": run,
            "voxel_spacing": spacing,
            "unit": "angstrom",
            "points": points,
            "trust_orientation": oriented,
        }
    return contents


def _write_all(contents: dict[Path, dict]) -> list[Path]:
    """Write every file to a temporary name, then rename them all (none renamed if one fails)."""
    temporary: list[tuple[Path, Path]] = []
    try:
        for target, content in contents.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".part", dir=target.parent
            )
            with os.fdopen(fd, "w") as handle:
                json.dump(content, handle, indent=4)
            temporary.append((Path(name), target))
    except BaseException:
        for tmp, _ in temporary:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    for tmp, target in temporary:
        os.replace(tmp, target)
    return [target for _, target in temporary]
