"""Particle densities for simulation: built-in shapes, density maps and atomic models.

Every density is a :class:`ParticleTemplate`: a cube of voxels at the target
voxel size, centred on the particle's centre of mass, in units of protein
density (1 = the mean density of protein, 0 = the surrounding ice).

- Built-in classes are procedural (unions of soft-edged ellipsoids and tubes
  defined in Å), so they need no files and come out right at any voxel size.
  Assemblies of point-like subunits are in :mod:`cryocaps.assemblies`.
- Density maps (MRC, any voxel size) are resampled to the target voxel size.
- Atomic models (PDB or mmCIF, optionally gzipped; read by :mod:`cryocaps.io.atoms`)
  become density by summing per-atom Gaussians weighted by atomic number, on the
  target grid.

``radius_angstrom`` of a template is measured from its density: the largest
distance from the centre of mass of any voxel at or above half the density's
maximum (the particle's envelope; label spheres use this radius).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from cryocaps.errors import CryocapsError
from cryocaps.io.atoms import read_atoms

log = logging.getLogger(__name__)

MAP_SUFFIXES = (".mrc", ".map", ".mrc.gz", ".map.gz")
MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")
ENVELOPE_FRACTION = 0.5  # envelope contour, as a fraction of the density's maximum
TAIL_FRACTION = 0.01  # densities below this fraction of the maximum are cut off
# Electrons per Å^3 in protein without hydrogens (~52 e per 135 Å^3 residue):
# an atomic model summed by atomic number is divided by this to read 1 inside protein.
PROTEIN_ELECTRONS_PER_A3 = 0.385
# Mean density inside the envelope of a model-derived density at 10 Å (measured on
# the SHREC classes 1bxn, 3cf3, 1u6g, 2cg9, 3gl1): maps are scaled to match it.
MAP_ENVELOPE_MEAN = 0.62


@dataclass
class ParticleTemplate:
    """One particle class's density.

    Attributes
    ----------
    name : class name
    density : (B, B, B) float32 cube, centre of mass at voxel (B - 1) / 2 on every axis;
        protein = 1, surroundings 0; B is large enough to hold any rotation.
    voxel_size_angstrom : voxel size of ``density``
    radius_angstrom : envelope radius (see module docstring)
    source : where it came from ("built-in", a file path)
    """

    name: str
    density: np.ndarray
    voxel_size_angstrom: float
    radius_angstrom: float
    source: str = "built-in"

    @property
    def radius_voxels(self) -> float:
        return self.radius_angstrom / self.voxel_size_angstrom

    @property
    def envelope_level(self) -> float:
        return ENVELOPE_FRACTION * float(self.density.max())

    @property
    def envelope_volume_angstrom3(self) -> float:
        """Volume inside the envelope contour (what ``simulate --label-shape template`` labels)."""
        inside = int((self.density >= self.envelope_level).sum())
        return inside * self.voxel_size_angstrom**3


def make_template(
    name: str, density: np.ndarray, voxel_size_angstrom: float, source: str
) -> ParticleTemplate:
    """Centre ``density`` on its centre of mass, crop it to a cube that holds any rotation.

    ``density`` is (Z, Y, X), protein positive; values below ``TAIL_FRACTION``
    of the maximum are set to 0.
    """
    density = np.asarray(density, dtype=np.float32)
    peak = float(density.max()) if density.size else 0.0
    if not peak > 0:
        raise CryocapsError(f"{source}: density has no positive values")
    density = np.where(density >= TAIL_FRACTION * peak, density, 0.0).astype(np.float32)
    centre = np.array(ndimage.center_of_mass(density))
    support = np.argwhere(density > 0)
    reach = float(np.sqrt(((support - centre) ** 2).sum(axis=1)).max())
    half = int(np.ceil(reach)) + 2
    size = 2 * half + 1
    # Shift so that the centre of mass lands exactly on the cube's central voxel.
    grid = np.indices((size, size, size), dtype=np.float32) - half
    coords = grid + centre.reshape(3, 1, 1, 1).astype(np.float32)
    cube = ndimage.map_coordinates(density, coords, order=1, mode="constant", cval=0.0)
    cube = np.clip(cube, 0, None).astype(np.float32)
    return ParticleTemplate(
        name,
        cube,
        float(voxel_size_angstrom),
        measure_radius_angstrom(cube, voxel_size_angstrom),
        source,
    )


def measure_radius_angstrom(cube: np.ndarray, voxel_size_angstrom: float) -> float:
    """Largest distance from the cube centre of a voxel in the envelope, in Å (at least half a
    voxel)."""
    inside = np.argwhere(cube >= ENVELOPE_FRACTION * cube.max())
    centre = (np.array(cube.shape) - 1) / 2
    reach = float(np.sqrt(((inside - centre) ** 2).sum(axis=1)).max()) if len(inside) else 0.0
    return max(reach + 0.5, 0.5) * float(voxel_size_angstrom)


# --- rotations -----------------------------------------------------------------


def relion_euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's rotation matrix A for ZYZ Euler angles in degrees (arrays broadcast).

    A = Rz(psi) Ry(tilt) Rz(rot) with RELION's Rz(a) = [[cos a, sin a, 0],
    [-sin a, cos a, 0], [0, 0, 1]] (as in RELION's ``Euler_angles2matrix``).
    A particle with these angles is its class density rotated by A: the point
    p (x, y, z, Å from the centre) of the class density appears at A @ p in the
    tomogram, so ``particle(x) = density(A.T @ x)``.

    Returns
    -------
    (..., 3, 3) float64, acting on (x, y, z) column vectors
    """
    from cryocaps.io.formats.angles import relion_orientation

    angles = np.stack(np.broadcast_arrays(*(np.asarray(a, float) for a in (rot, tilt, psi))), -1)
    matrices = relion_orientation(angles.reshape(-1, 3)).as_matrix()  # RELION's A is O
    return matrices.reshape(angles.shape[:-1] + (3, 3))


# --- built-in procedural classes ---------------------------------------------


@dataclass(frozen=True)
class _Ellipsoid:
    centre: tuple[float, float, float]  # x, y, z in Å
    axes: tuple[float, float, float]  # semi-axes along the local x, y, z in Å
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)  # rot, tilt, psi in degrees

    def distance(self, points: np.ndarray) -> np.ndarray:
        local = _to_local(points, self.centre, self.angles) / np.array(self.axes)
        return (np.sqrt((local**2).sum(axis=-1)) - 1.0) * min(self.axes)

    @property
    def reach(self) -> float:  # Å from the origin
        return float(np.linalg.norm(self.centre)) + max(self.axes)


@dataclass(frozen=True)
class _Tube:
    centre: tuple[float, float, float]
    outer: float
    inner: float
    height: float  # along the local z axis
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def distance(self, points: np.ndarray) -> np.ndarray:
        local = _to_local(points, self.centre, self.angles)
        rho = np.sqrt(local[..., 0] ** 2 + local[..., 1] ** 2)
        radial = np.maximum(rho - self.outer, self.inner - rho)
        return np.maximum(radial, np.abs(local[..., 2]) - self.height / 2)

    @property
    def reach(self) -> float:
        return float(np.linalg.norm(self.centre) + np.hypot(self.outer, self.height / 2))


def _to_local(points: np.ndarray, centre, angles) -> np.ndarray:
    matrix = relion_euler_to_matrix(*angles)  # places the local shape: p = A @ local
    return (points - np.array(centre)) @ matrix


# Sizes follow the paper's SHREC classes: a small protein (~35 Å), a medium
# complex, an elongated one, and a large asymmetric ribosome-like particle.
BUILTIN_SHAPES: dict[str, list] = {
    "globule": [
        _Ellipsoid((0, 0, 0), (31, 25, 22)),
        _Ellipsoid((18, 10, 8), (15, 13, 12)),
    ],
    "barrel": [  # four stacked rings, proteasome-like
        _Tube((0, 0, z), outer, 17, 22)
        for z, outer in ((-37.5, 38), (-12.5, 45), (12.5, 45), (37.5, 38))
    ],
    "dumbbell": [
        _Ellipsoid((-50, 0, 0), (36, 36, 36)),
        _Ellipsoid((54, 0, 0), (29, 29, 29)),
        _Tube((0, 0, 0), 15, 0, 100, (0, 90, 0)),
    ],
    "ribosome": [
        _Ellipsoid((0, 0, -22), (95, 82, 66)),  # large subunit
        _Ellipsoid((12, 8, 52), (76, 48, 34), (30, 15, 0)),  # small subunit
        _Ellipsoid((-8, 32, 34), (28, 22, 26)),  # central protuberance
        _Ellipsoid((-88, 34, -8), (34, 11, 11), (20, 0, 0)),  # stalk
        _Ellipsoid((74, -50, 6), (26, 14, 14), (-40, 0, 0)),  # second stalk
        _Ellipsoid((62, 22, 70), (22, 18, 18)),  # head
    ],
}


def builtin_template(name: str, voxel_size_angstrom: float) -> ParticleTemplate:
    """Render a built-in class at ``voxel_size_angstrom`` (soft edges, half a voxel wide)."""
    return shapes_template(name, BUILTIN_SHAPES[name], voxel_size_angstrom)


def shapes_template(name: str, shapes: Sequence, voxel_size_angstrom: float) -> ParticleTemplate:
    """Render a union of shapes (each with ``distance(points)``, the signed distance in Å of
    (..., 3) x, y, z points, and ``reach``, Å from the origin) with soft edges (tanh, half a
    voxel wide: a shape smaller than a voxel still leaves its mass on the grid)."""
    reach = max(shape.reach for shape in shapes)
    half = int(np.ceil(reach / voxel_size_angstrom)) + 2
    axis = (np.arange(2 * half + 1) - half) * voxel_size_angstrom
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    points = np.stack([x, y, z], axis=-1)
    distance = np.min([shape.distance(points) for shape in shapes], axis=0)
    density = 0.5 * (1.0 - np.tanh(distance / (0.5 * voxel_size_angstrom)))
    return make_template(name, density.astype(np.float32), voxel_size_angstrom, "built-in")


def with_contrast(template: ParticleTemplate, factor: float, name: str) -> ParticleTemplate:
    """A copy of ``template`` named ``name``, its density ``factor`` times the original's (a
    low-contrast class); radius and envelope (fractions of the maximum) stay the same."""
    if not 0 < factor:
        raise CryocapsError(f"{name}: contrast factor must be > 0, got {factor}")
    return replace(template, name=name, density=(template.density * factor).astype(np.float32))


def atoms_to_density(
    coords: np.ndarray,
    atomic_numbers: np.ndarray,
    voxel_size_angstrom: float,
    *,
    sigma_angstrom: float | None = None,
    margin_voxels: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of per-atom Gaussians weighted by atomic number, sampled on a voxel grid.

    Atoms are spread onto the 8 nearest voxels (trilinear weights) and the grid
    is then blurred so that each atom's total footprint is a Gaussian of
    standard deviation ``sigma_angstrom`` (default: max(1 Å, half a voxel)).

    Returns
    -------
    density : (Z, Y, X) float32, in units of protein density (1 inside protein)
    origin : (3,) x, y, z position in Å of voxel (0, 0, 0)
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    weights = np.asarray(atomic_numbers, dtype=np.float64).reshape(-1)
    voxel = float(voxel_size_angstrom)
    sigma = float(sigma_angstrom) if sigma_angstrom is not None else max(1.0, 0.5 * voxel)
    pad = margin_voxels + int(np.ceil(3 * sigma / voxel))
    origin = np.floor(coords.min(axis=0) / voxel) * voxel - pad * voxel
    position = (coords - origin) / voxel  # x, y, z in voxels
    shape_xyz = np.ceil(position.max(axis=0)).astype(int) + pad + 1
    base = np.floor(position).astype(np.int64)
    fraction = position - base
    nx, ny, nz = (int(s) for s in shape_xyz)
    flat = np.zeros(nz * ny * nx, dtype=np.float64)
    for corner in np.ndindex(2, 2, 2):
        offset = np.array(corner)
        weight = weights * np.prod(np.where(offset, fraction, 1.0 - fraction), axis=1)
        ix, iy, iz = (base + offset).T
        flat += np.bincount((iz * ny + iy) * nx + ix, weights=weight, minlength=flat.size)
    grid = flat.reshape(nz, ny, nx)
    # Trilinear spreading already blurs by a variance of 1/6 voxel^2 per axis.
    extra = np.sqrt(max((sigma / voxel) ** 2 - 1.0 / 6.0, 0.0))
    if extra > 0.05:
        grid = ndimage.gaussian_filter(grid, extra, mode="constant", truncate=4.0)
    grid /= PROTEIN_ELECTRONS_PER_A3 * voxel**3
    return grid.astype(np.float32), origin


# --- density maps --------------------------------------------------------------


def read_density_map(path: str | os.PathLike, voxel_size_angstrom: float) -> np.ndarray:
    """A density map resampled to ``voxel_size_angstrom``, background removed, protein positive.

    The map is anti-alias filtered before downsampling. Its scale is set so that
    a map and an atomic model of the same complex carry about the same mass (maps
    carry no absolute units): the mean inside the envelope is ``MAP_ENVELOPE_MEAN``.
    """
    import mrcfile

    path = Path(path)
    try:  # (mrcfile reads gzipped maps too)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bad header is reported below, once
            with mrcfile.open(path, permissive=True) as mrc:
                data = None if mrc.data is None else np.array(mrc.data, dtype=np.float32)
                source_voxel = float(mrc.voxel_size.x)
    except Exception as error:  # noqa: BLE001 - anything mrcfile raises means unreadable
        raise CryocapsError(f"{path}: not a readable MRC density map ({error})") from error
    if data is None:
        raise CryocapsError(f"{path}: not a readable MRC density map (no data block)")
    if data.ndim != 3 or min(data.shape) < 2:
        raise CryocapsError(f"{path}: expected a 3D density map")
    if not np.isfinite(data).all():
        raise CryocapsError(f"{path}: density map contains NaN or infinite values")
    if not source_voxel > 0:
        raise CryocapsError(
            f"{path}: voxel size in the header is {source_voxel:g} Å; cannot resample"
        )
    edges = np.concatenate(
        [data[[0, -1]].ravel(), data[:, [0, -1]].ravel(), data[:, :, [0, -1]].ravel()]
    )
    data = data - float(np.median(edges))
    if data.max() <= 0 < -data.min():
        data = -data  # protein drawn dark: flip to positive
    data = np.clip(data, 0, None)
    data = resample(data, source_voxel, voxel_size_angstrom)
    if not data.max() > 0:
        raise CryocapsError(f"{path}: density map is empty after resampling")
    envelope = data >= ENVELOPE_FRACTION * data.max()
    return (data * (MAP_ENVELOPE_MEAN / data[envelope].mean())).astype(np.float32)


def resample(data: np.ndarray, from_voxel: float, to_voxel: float) -> np.ndarray:
    """Resample a (Z, Y, X) volume from one voxel size to another (centres kept)."""
    ratio = to_voxel / from_voxel
    if abs(ratio - 1.0) < 1e-3:
        return data.astype(np.float32)
    if ratio > 1:  # downsampling: low-pass first so that nothing aliases
        data = ndimage.gaussian_filter(data, 0.5 * ratio, mode="constant")
    out_shape = [max(2, int(round(n / ratio))) for n in data.shape]
    axes = [
        (np.arange(m) - (m - 1) / 2) * ratio + (n - 1) / 2
        for m, n in zip(out_shape, data.shape, strict=True)
    ]
    coords = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(
        data, coords, order=1 if ratio > 1 else 3, mode="constant"
    ).astype(np.float32)


# --- folders of structures ---------------------------------------------------

_RESOLUTION_TAG = re.compile(r"_\d+(\.\d+)?A$", re.IGNORECASE)


def structure_name(path: Path) -> str:
    """Class name of a structure file: ``4v4r_10A.mrc`` -> ``4v4r``, ``1bxn.pdb.gz`` -> ``1bxn``."""
    name = path.name
    for suffix in sorted(MAP_SUFFIXES + MODEL_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _RESOLUTION_TAG.sub("", name)


def _is_map(path: Path) -> bool:
    return path.name.lower().endswith(MAP_SUFFIXES)


def _is_model(path: Path) -> bool:
    return path.name.lower().endswith(MODEL_SUFFIXES)


def find_structures(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """Structure files in ``folder`` grouped by class name (sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise CryocapsError(f"--structures {folder}: {what} (give a folder of maps and models)")
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and (_is_map(path) or _is_model(path)):
            groups.setdefault(structure_name(path), []).append(path)
    if not groups:
        raise CryocapsError(
            f"--structures {folder}: no density maps (.mrc/.map) or atomic models "
            "(.pdb/.cif, optionally .gz) found"
        )
    return dict(sorted(groups.items()))


def _map_voxel_size(path: Path) -> float:
    import mrcfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                return float(mrc.voxel_size.x)
    except Exception:  # noqa: BLE001 - unreadable header: rank it last
        return float("nan")


def choose_structure_file(
    paths: list[Path], voxel_size_angstrom: float, prefer: str = "maps"
) -> Path:
    """The file to use for one class: a map with the nearest voxel size, or a model."""
    maps = [p for p in paths if _is_map(p)]
    models = [p for p in paths if _is_model(p)]

    def mismatch(path: Path) -> float:
        size = _map_voxel_size(path)
        return abs(np.log(size / voxel_size_angstrom)) if size > 0 else np.inf

    best_map = min(maps, key=mismatch) if maps else None
    if prefer == "models" and models:
        return models[0]
    return best_map if best_map is not None else models[0]


def load_structure_templates(
    folder: str | os.PathLike,
    voxel_size_angstrom: float,
    *,
    names: Sequence[str] | None = None,
    prefer: str = "maps",
) -> list[ParticleTemplate]:
    """Templates for the structures in ``folder`` (all, or the classes in ``names``)."""
    if prefer not in ("maps", "models"):
        raise CryocapsError(f"--prefer {prefer!r}: use maps or models")
    groups = find_structures(folder)
    if names:
        unknown = [n for n in names if n not in groups]
        if unknown:
            raise CryocapsError(
                f"--classes-from: {', '.join(unknown)} not found in {folder}; "
                f"available: {', '.join(groups)}"
            )
        groups = {n: groups[n] for n in names}
    templates, failures = [], []
    for name, paths in groups.items():
        path = choose_structure_file(paths, voxel_size_angstrom, prefer)
        try:
            templates.append(load_structure(path, voxel_size_angstrom, name))
        except CryocapsError as error:
            if names:  # asked for by name: that is an error
                raise
            failures.append(str(error))
            continue
        log.debug("%s: %s, radius %.0f Å", name, path.name, templates[-1].radius_angstrom)
    if not templates:
        raise CryocapsError(
            f"--structures {folder}: no readable density map or atomic model ({failures[0]})"
        )
    for failure in failures:
        log.warning("skipping %s", failure)
    return templates


def load_structure(
    path: str | os.PathLike, voxel_size_angstrom: float, name: str | None = None
) -> ParticleTemplate:
    """Template from one density map or atomic model file, at ``voxel_size_angstrom``."""
    path = Path(path)
    if _is_map(path):
        density = read_density_map(path, voxel_size_angstrom)
    else:
        coords, numbers = read_atoms(path)
        density, _ = atoms_to_density(coords, numbers, voxel_size_angstrom)
    return make_template(name or structure_name(path), density, voxel_size_angstrom, str(path))


def builtin_templates(
    voxel_size_angstrom: float, names: Sequence[str] | None = None
) -> list[ParticleTemplate]:
    """The built-in classes (all, or those in ``names``) at ``voxel_size_angstrom``."""
    if names:
        unknown = [n for n in names if n not in BUILTIN_SHAPES]
        if unknown:
            raise CryocapsError(
                f"--classes-from: unknown built-in class(es) {', '.join(unknown)}; "
                f"built-in: {', '.join(BUILTIN_SHAPES)} (or give --structures DIR)"
            )
    return [builtin_template(n, voxel_size_angstrom) for n in (names or BUILTIN_SHAPES)]
