"""RELION 3, 4 and 5 particle STAR files.

- RELION 5: ``rlnTomoName`` + ``rlnCenteredCoordinateX/Y/ZAngst`` (Å from the
  tomogram centre): voxel = centred_Å / voxel_size + size / 2.
- RELION 4: ``rlnTomoName`` + ``rlnCoordinateX/Y/Z`` in tilt-series (bin 1)
  pixels of ``rlnTomoTiltSeriesPixelSize`` (optics block or particle table).
- RELION 3: ``rlnMicrographName`` + ``rlnCoordinateX/Y/Z`` in pixels, by default
  the tomogram's own voxels.

Origins are subtracted as RELION does: position = coordinate - A_sub · origin,
``rlnOrigin*Angst`` in Å, RELION 3's ``rlnOriginX/Y/Z`` in pixels; A_sub is the
``rlnTomoSubtomogram*`` rotation (identity when absent), which also pre-rotates
the particle: orientation = A_sub · A_particle.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cryocaps.errors import CryocapsError
from cryocaps.io.formats.angles import relion_angles, relion_orientation, wrap_degrees
from cryocaps.io.formats.context import (
    XYZ,
    Geometry,
    canonical_frame,
    clean_tomogram_name,
    require_columns,
    table_angles,
    table_scores,
)
from cryocaps.io.formats.star import loop_blocks, read_star, write_star

CENTRED = [
    "rlnCenteredCoordinateXAngst",
    "rlnCenteredCoordinateYAngst",
    "rlnCenteredCoordinateZAngst",
]
COORDS = ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]
ORIGIN_ANGSTROM = ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]
ORIGIN_PIXELS = ["rlnOriginX", "rlnOriginY", "rlnOriginZ"]
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
SUBTOMOGRAM_ANGLES = ["rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi"]
SCORES = ["rlnAutopickFigureOfMerit", "rlnLCCmax", "rlnMaxValueProbDistribution"]
PIXEL_SIZE = "rlnTomoTiltSeriesPixelSize"

REQUIRED = {
    "relion5": ["rlnTomoName", *CENTRED],
    "relion4": ["rlnTomoName", *COORDS],
    "relion3": ["rlnMicrographName", *COORDS],
}
TITLES = {
    "relion5": "RELION 5 particle",
    "relion4": "RELION 4 particle",
    "relion3": "RELION 3 particle",
}


# --- detection -----------------------------------------------------------------
def particle_block(blocks: dict, path) -> pd.DataFrame:
    """The particle table of a RELION STAR file: ``data_particles`` or the block with
    coordinates.
    """
    loops = loop_blocks(blocks)
    if "particles" in loops:
        return loops["particles"]
    for frame in loops.values():
        if any(c in frame.columns for c in CENTRED + COORDS):
            return frame
    if "global" in loops and "rlnTomoSizeX" in loops["global"].columns:
        raise CryocapsError(
            f"{path}: a RELION 5 tomograms.star, not a particle file; give it with --tomograms"
        )
    columns = sorted({c for frame in loops.values() for c in frame.columns})
    raise CryocapsError(
        f"{path}: no particle coordinates: needs rlnCenteredCoordinateX/Y/ZAngst (RELION 5) or "
        f"rlnCoordinateX/Y/Z (RELION 3/4); found {', '.join(columns[:8]) or 'no columns'}"
    )


def detect_version(blocks: dict, path) -> str:
    """relion5, relion4 or relion3 from the particle table's columns."""
    columns = set(particle_block(blocks, path).columns)
    if CENTRED[0] in columns:
        return "relion5"
    if "rlnTomoName" in columns:
        return "relion4"
    if "rlnMicrographName" in columns:
        return "relion3"
    raise CryocapsError(
        f"{path}: RELION coordinates without a tomogram column: needs rlnTomoName (RELION 4/5) "
        "or rlnMicrographName (RELION 3)"
    )


# --- reading -------------------------------------------------------------------
def read_relion5(path, geometry: Geometry) -> pd.DataFrame:
    return _read(path, geometry, "relion5")


def read_relion4(path, geometry: Geometry) -> pd.DataFrame:
    return _read(path, geometry, "relion4")


def read_relion3(path, geometry: Geometry) -> pd.DataFrame:
    return _read(path, geometry, "relion3")


def _read(path, geometry: Geometry, version: str) -> pd.DataFrame:
    blocks = read_star(path)
    particles = particle_block(blocks, path).reset_index(drop=True)
    require_columns(particles, REQUIRED[version], path, TITLES[version])
    tomos = particles[REQUIRED[version][0]].map(clean_tomogram_name).astype(str)
    subtomogram = _subtomogram_orientation(particles)
    origin, origin_unit = _origins(particles, subtomogram)

    if version == "relion5":
        centred = _numbers(particles, CENTRED, path)
        if origin is not None:
            centred = centred - origin  # rlnOrigin*Angst: Å, like the centred coordinates
        positions = _centred_to_voxels(centred, tomos, geometry, path)
    else:
        pixel = (
            _pixel_size(particles, loop_blocks(blocks).get("optics"))
            if version == "relion4"
            else None
        )
        coords = _numbers(particles, COORDS, path)
        if origin is not None:
            if origin_unit == "angstrom":
                origin = origin / _origin_pixel_size(pixel, tomos, geometry, path)[:, None]
            coords = coords - origin
        positions = geometry.pixels_to_voxels(coords, tomos, pixel, path)

    angles = _angles(particles, subtomogram)
    classes = particles["rlnClassNumber"] if "rlnClassNumber" in particles else None
    score_column = next((c for c in SCORES if c in particles.columns), None)
    scores = particles[score_column].to_numpy(dtype=float) if score_column else None
    return canonical_frame(
        tomos, geometry.class_names(classes, len(particles), path), positions, scores, angles
    )


def _numbers(frame: pd.DataFrame, columns: list[str], path) -> np.ndarray:
    try:
        values = frame[columns].to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise CryocapsError(f"{path}: non-numeric values in {', '.join(columns)}") from None
    if not np.isfinite(values).all():
        raise CryocapsError(f"{path}: missing or non-finite values in {', '.join(columns)}")
    return values


def _centred_to_voxels(
    centred: np.ndarray, tomos: pd.Series, geometry: Geometry, path
) -> np.ndarray:
    positions = np.empty_like(centred)
    for name in pd.unique(tomos):
        rows = (tomos == name).to_numpy()
        info = geometry.require_tomogram(name, path, "RELION 5 centred coordinates")
        size_xyz = np.array(info.shape[::-1], dtype=float)
        positions[rows] = centred[rows] / info.voxel_size_angstrom + size_xyz / 2
    return positions


def _subtomogram_orientation(particles: pd.DataFrame):
    if not set(SUBTOMOGRAM_ANGLES) <= set(particles.columns):
        return None
    return relion_orientation(particles[SUBTOMOGRAM_ANGLES].to_numpy(dtype=float))


def _origins(particles: pd.DataFrame, subtomogram) -> tuple[np.ndarray | None, str | None]:
    """Origin offsets rotated into the tomogram frame, and their unit (angstrom / pixel)."""
    for columns, unit in ((ORIGIN_ANGSTROM, "angstrom"), (ORIGIN_PIXELS, "pixel")):
        if any(c in particles.columns for c in columns):
            offsets = np.stack(
                [
                    particles[c].to_numpy(dtype=float)
                    if c in particles
                    else np.zeros(len(particles))
                    for c in columns
                ],
                axis=1,
            )
            offsets = np.nan_to_num(offsets)
            if subtomogram is not None:
                offsets = subtomogram.apply(offsets)
            return offsets, unit
    return None, None


def _pixel_size(particles: pd.DataFrame, optics: pd.DataFrame | None) -> np.ndarray | None:
    """Per-row tilt-series pixel size from the particle table or the optics block."""
    if PIXEL_SIZE in particles.columns:
        return particles[PIXEL_SIZE].to_numpy(dtype=float)
    if optics is None or PIXEL_SIZE not in optics.columns:
        return None
    if "rlnOpticsGroup" in particles.columns and "rlnOpticsGroup" in optics.columns:
        by_group = dict(
            zip(optics["rlnOpticsGroup"].astype(int), optics[PIXEL_SIZE].astype(float), strict=True)
        )
        return particles["rlnOpticsGroup"].astype(int).map(by_group).to_numpy(dtype=float)
    return np.full(len(particles), float(optics[PIXEL_SIZE].iloc[0]))


def _origin_pixel_size(pixel, tomos: pd.Series, geometry: Geometry, path) -> np.ndarray:
    """Pixel size of the coordinates, to turn rlnOrigin*Angst into pixels."""
    if geometry.coords_pixel_size_angstrom is not None:
        return np.full(len(tomos), geometry.coords_pixel_size_angstrom)
    if pixel is not None and np.isfinite(pixel).all():
        return np.asarray(pixel, dtype=float)
    sizes = np.empty(len(tomos))
    for name in pd.unique(tomos):  # coordinates are in the tomogram's own voxels
        info = geometry.require_tomogram(
            name, path, "rlnOrigin*Angst with no pixel size in the file"
        )
        sizes[(tomos == name).to_numpy()] = info.voxel_size_angstrom
    return sizes


def _angles(particles: pd.DataFrame, subtomogram) -> np.ndarray | None:
    if any(c in particles.columns for c in ANGLES):
        part = np.stack(
            [
                np.nan_to_num(particles[c].to_numpy(dtype=float))
                if c in particles
                else np.zeros(len(particles))
                for c in ANGLES
            ],
            axis=1,
        )
        if subtomogram is None:
            return wrap_degrees(part)
        return relion_angles(subtomogram * relion_orientation(part))
    if subtomogram is not None:
        return relion_angles(subtomogram)
    return None


# --- writing -------------------------------------------------------------------
def _common_columns(table: pd.DataFrame, geometry: Geometry, path) -> dict:
    angles = table_angles(table)
    return {
        ANGLES[0]: angles[:, 0],
        ANGLES[1]: angles[:, 1],
        ANGLES[2]: angles[:, 2],
        "rlnClassNumber": geometry.class_numbers(table["class_name"], path),
        "rlnAutopickFigureOfMerit": table_scores(table),
    }


def write_relion5(table: pd.DataFrame, path, geometry: Geometry, target=None) -> None:
    """A RELION 5 particle list as its Import Coordinates job reads it (one data_particles
    block).
    """
    tomos = table["tomo"].astype(str)
    positions = table[XYZ].to_numpy(dtype=float)
    centred = np.empty_like(positions)
    for name in pd.unique(tomos):
        rows = (tomos == name).to_numpy()
        info = geometry.require_tomogram(
            name, target or path, "writing RELION 5 centred coordinates"
        )
        size_xyz = np.array(info.shape[::-1], dtype=float)
        centred[rows] = (positions[rows] - size_xyz / 2) * info.voxel_size_angstrom
    frame = pd.DataFrame({"rlnTomoName": tomos.to_numpy()})
    for i, column in enumerate(CENTRED):
        frame[column] = centred[:, i]
    frame = frame.assign(**_common_columns(table, geometry, target or path))
    write_star({"particles": frame}, path)


def write_relion4(table: pd.DataFrame, path, geometry: Geometry, target=None) -> None:
    """RELION 4: coordinates in pixels of rlnTomoTiltSeriesPixelSize (given in an optics block)."""
    tomos = table["tomo"].astype(str)
    coords, pixel = geometry.voxels_to_pixels(table[XYZ].to_numpy(dtype=float), tomos)
    frame = pd.DataFrame({"rlnTomoName": tomos.to_numpy()})
    for i, column in enumerate(COORDS):
        frame[column] = coords[:, i]
    frame = frame.assign(**_common_columns(table, geometry, target or path))
    blocks = {}
    if pixel is not None:
        blocks["optics"] = pd.DataFrame(
            {"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], PIXEL_SIZE: [pixel]}
        )
        frame["rlnOpticsGroup"] = 1
    blocks["particles"] = frame
    write_star(blocks, path)


def write_relion3(table: pd.DataFrame, path, geometry: Geometry, target=None) -> None:
    """RELION 3: ``rlnMicrographName`` = <tomo>.mrc, coordinates in the tomogram's voxels
    (or in pixels of ``--coords-pixel-size-angstrom``)."""
    tomos = table["tomo"].astype(str)
    coords, _ = geometry.voxels_to_pixels(table[XYZ].to_numpy(dtype=float), tomos)
    frame = pd.DataFrame({"rlnMicrographName": (tomos + ".mrc").to_numpy()})
    for i, column in enumerate(COORDS):
        frame[column] = coords[:, i]
    frame = frame.assign(**_common_columns(table, geometry, target or path))
    write_star({"particles": frame}, path)
