"""What a particle reader or writer knows besides the file: tomograms, classes, pixel size.

Every format module takes a :class:`Geometry` and uses its helpers, so that
tomogram look-up, tomogram numbering, class numbering and pixel scaling work
the same way in every format.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.classes import ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.io.copick_project import CopickSelection
from cryocaps.io.volumes import TomogramInfo, base_tomogram_name

log = logging.getLogger(__name__)

CANONICAL_COLUMNS = ["tomo", "class_name", "x", "y", "z", "score"]
ANGLE_COLUMNS = ["rot", "tilt", "psi"]
XYZ = ["x", "y", "z"]


@dataclass
class Geometry:
    """Tomograms (in the order given), class table and coordinate pixel size of one conversion.

    ``coords_pixel_size_angstrom`` is the pixel size of coordinates in files that
    store pixels (RELION 3/4, STOPGAP, Dynamo); ``None`` means "the file says, or
    the tomogram's own voxels". ``copick`` selects what a copick project's picks
    reader takes (user, session, objects, voxel spacing) and whom its writer writes as.
    """

    tomograms: list[TomogramInfo] = field(default_factory=list)
    classes: ClassTable | None = None
    coords_pixel_size_angstrom: float | None = None
    copick: CopickSelection | None = None

    def __post_init__(self) -> None:
        px = self.coords_pixel_size_angstrom
        if px is not None and not (np.isfinite(px) and px > 0):
            raise CryocapsError(f"--coords-pixel-size-angstrom must be > 0, got {px}")
        self._by_name = {info.name: info for info in self.tomograms}
        for (
            info
        ) in self.tomograms:  # label/probability maps given as tomograms: TS_01_labels -> TS_01
            self._by_name.setdefault(base_tomogram_name(info.name), info)

    # --- tomograms -------------------------------------------------------
    def tomogram(self, name: str) -> TomogramInfo | None:
        return self._by_name.get(str(name))

    def require_tomogram(self, name: str, path, purpose: str) -> TomogramInfo:
        info = self.tomogram(name)
        if info is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise CryocapsError(
                f"{path}: {purpose} needs the size and voxel size of tomogram {name!r}; "
                "give its MRC file or a RELION 5 tomograms.star with --tomograms "
                f"(tomograms given: {known})"
            )
        return info

    def names_for_numbers(self, numbers: Iterable[int], path, column: str) -> dict[int, str]:
        """Tomogram name for each STOPGAP/Dynamo tomogram number.

        A number matches the tomogram whose name ends in it (``TS_01``, ``tomo_1``);
        otherwise the k-th tomogram given. Without tomograms the number itself
        (as text) is the name.
        """
        numbers = sorted({int(n) for n in numbers})
        if not self.tomograms:
            return {n: str(n) for n in numbers}
        by_number: dict[int, list[str]] = {}
        for info in self.tomograms:
            k = trailing_number(info.name)
            if k is not None:
                by_number.setdefault(k, []).append(info.name)
        names = {}
        for n in numbers:
            matches = by_number.get(n, [])
            if len(matches) > 1:
                raise CryocapsError(
                    f"{path}: {column} {n} matches several tomograms: {', '.join(matches)}"
                )
            if matches:
                names[n] = matches[0]
            elif 1 <= n <= len(self.tomograms):
                names[n] = self.tomograms[n - 1].name
                if by_number:
                    log.warning(
                        "%s: %s %d matches no tomogram name; using tomogram %d given (%s)",
                        path,
                        column,
                        n,
                        n,
                        names[n],
                    )
            else:
                given = ", ".join(info.name for info in self.tomograms)
                raise CryocapsError(
                    f"{path}: {column} {n} matches no tomogram given with --tomograms ({given})"
                )
        return names

    def numbers_for_names(self, names: Sequence[str]) -> dict[str, int]:
        """STOPGAP/Dynamo tomogram number for each tomogram name (inverse of
        :meth:`names_for_numbers`)."""
        unique = list(dict.fromkeys(str(n) for n in names))
        numbers = {name: trailing_number(name) for name in unique}
        values = list(numbers.values())
        if None not in values and len(set(values)) == len(values):
            return numbers  # type: ignore[return-value]
        order = [info.name for info in self.tomograms] or sorted(unique)
        missing = [name for name in unique if name not in order]
        order += sorted(missing)
        numbering = {name: order.index(name) + 1 for name in unique}
        log.info("tomogram numbers: %s", ", ".join(f"{k}={v}" for k, v in numbering.items()))
        return numbering

    # --- classes ---------------------------------------------------------
    def class_names(self, numbers: pd.Series | None, n_rows: int, path) -> list[str]:
        """Class names for class numbers read from a file (``"1"`` for all rows when absent)."""
        if numbers is None:
            values = ["1"] * n_rows
        else:
            values = [_number_text(v) for v in numbers]
        if self.classes is None:
            return values
        mapping = {}
        for value in dict.fromkeys(values):
            try:
                mapping[value] = self.classes.name_of(value)
            except CryocapsError as error:
                raise CryocapsError(f"{path}: {error}") from None
        return [mapping[v] for v in values]

    def class_numbers(self, names: pd.Series, path) -> np.ndarray:
        """Class numbers (labels) to write for canonical class names."""
        out = []
        cache: dict[str, int] = {}
        for name in names.astype(str):
            if name not in cache:
                cache[name] = self._class_number(name, path)
            out.append(cache[name])
        return np.asarray(out, dtype=int)

    def _class_number(self, name: str, path) -> int:
        if self.classes is not None:
            try:
                return self.classes.by_name(self.classes.name_of(name)).label
            except CryocapsError as error:
                raise CryocapsError(f"{path}: {error}") from None
        try:
            number = float(name)
        except ValueError:
            number = float("nan")
        if not (np.isfinite(number) and number == int(number)):
            raise CryocapsError(
                f"{path}: class {name!r} is not a number; "
                "give --classes classes.csv to number the classes"
            )
        return int(number)

    # --- pixels <-> voxels ---------------------------------------------------
    def pixels_to_voxels(
        self, positions: np.ndarray, tomos: pd.Series, pixel_size, path
    ) -> np.ndarray:
        """Scale 0-based pixel positions (N, 3) to voxels of each row's tomogram.

        ``pixel_size`` (scalar, per-row array or None) is the file's pixel size;
        ``--coords-pixel-size-angstrom`` overrides it. Rows whose pixel size or
        tomogram voxel size is unknown keep their values (pixels = voxels).
        """
        if self.coords_pixel_size_angstrom is not None:
            pixel_size = self.coords_pixel_size_angstrom
        if pixel_size is None:
            return positions
        pixel = np.broadcast_to(np.asarray(pixel_size, dtype=float), (len(positions),))
        out = positions.copy()
        unknown = []
        for name in pd.unique(tomos):
            rows = (tomos == name).to_numpy()
            info = self.tomogram(name)
            if info is None:
                unknown.append(str(name))
                continue
            out[rows] = positions[rows] * (pixel[rows] / info.voxel_size_angstrom)[:, None]
        if unknown:
            log.warning(
                "%s: no voxel size for tomogram(s) %s; positions stay in the file's pixels (%s Å); "
                "give --tomograms to convert them",
                path,
                ", ".join(unknown),
                _describe(pixel),
            )
        return out

    def voxels_to_pixels(
        self, positions: np.ndarray, tomos: pd.Series
    ) -> tuple[np.ndarray, float | None]:
        """Inverse of :meth:`pixels_to_voxels` for writers: positions in pixels and that pixel size.

        The pixel size is ``--coords-pixel-size-angstrom`` when given, else the
        tomograms' voxel size (positions unchanged), else unknown (``None``).
        """
        pixel = self.coords_pixel_size_angstrom
        names = [str(n) for n in pd.unique(tomos)]
        infos = [self.tomogram(n) for n in names]
        if pixel is None:
            sizes = {round(i.voxel_size_angstrom, 6) for i in infos if i is not None}
            if len(sizes) > 1:
                raise CryocapsError(
                    "the tomograms have different voxel sizes "
                    f"({', '.join(f'{s:g}' for s in sorted(sizes))} Å); "
                    "give --coords-pixel-size-angstrom to write all coordinates at one pixel size"
                )
            return positions, (sizes.pop() if sizes else None)
        out = positions.copy()
        for name, info in zip(names, infos, strict=True):
            if info is None:
                raise CryocapsError(
                    f"--coords-pixel-size-angstrom needs the voxel size of tomogram {name!r}; "
                    "give it with --tomograms"
                )
            rows = (tomos.astype(str) == name).to_numpy()
            out[rows] = positions[rows] * (info.voxel_size_angstrom / pixel)
        return out, pixel


def trailing_number(name: str) -> int | None:
    """``TS_01`` -> 1, ``tomo_12`` -> 12, ``lamella`` -> None."""
    match = re.search(r"(\d+)$", str(name))
    return int(match.group(1)) if match else None


def clean_tomogram_name(text) -> str:
    """Tomogram name from a file's tomogram column: no folder, no ``.tomostar``/MRC suffix."""
    from cryocaps.io.volumes import tomogram_name

    name = Path(str(text).strip()).name
    for suffix in (".tomostar", ".star"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return tomogram_name(name)


def require_columns(frame: pd.DataFrame, columns: Sequence[str], path, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CryocapsError(f"{path}: not a {what} file: missing column(s) {', '.join(missing)}")


def canonical_frame(
    tomos, class_names, positions: np.ndarray, scores, angles: np.ndarray | None
) -> pd.DataFrame:
    """Assemble the canonical table (angles in RELION ZYZ degrees, or None)."""
    frame = pd.DataFrame(
        {
            "tomo": pd.Series(list(tomos), dtype=object).astype(str),
            "class_name": pd.Series(list(class_names), dtype=object).astype(str),
            "x": positions[:, 0].astype(float),
            "y": positions[:, 1].astype(float),
            "z": positions[:, 2].astype(float),
            "score": np.asarray(scores, dtype=float) if scores is not None else np.nan,
        }
    )
    if angles is not None:
        for i, column in enumerate(ANGLE_COLUMNS):
            frame[column] = angles[:, i].astype(float)
    return frame


def table_angles(table: pd.DataFrame) -> np.ndarray:
    """(N, 3) RELION angles of a canonical table; 0 where absent."""
    if not set(ANGLE_COLUMNS) <= set(table.columns):
        return np.zeros((len(table), 3))
    return np.nan_to_num(table[ANGLE_COLUMNS].to_numpy(dtype=float))


def table_scores(table: pd.DataFrame) -> np.ndarray:
    """Scores to write: 0 where unknown (formats without a missing-value marker)."""
    return (
        np.nan_to_num(table["score"].to_numpy(dtype=float))
        if "score" in table
        else np.zeros(len(table))
    )


def _number_text(value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if np.isfinite(number) and number == int(number) else str(value)


def _describe(pixel: np.ndarray) -> str:
    values = sorted({round(float(v), 6) for v in pixel})
    return ", ".join(f"{v:g}" for v in values)
