"""Reading and writing the class table ``classes.csv`` (the types are in :mod:`cryocaps.classes`).

``classes.csv`` has the columns ``label,name,radius_angstrom`` and optionally
``template`` (path to a density map, relative to the CSV) and ``label_volume_angstrom3``
(:mod:`cryocaps.classes`). A copick ``config.json``
given as a class table means its pickable particle objects.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cryocaps.classes import REQUIRED_COLUMNS, ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.io.copick_project import CopickProject
from cryocaps.io.files import write_text_atomic
from cryocaps.io.layout import find_class_table_beside


def read_classes(path: str | os.PathLike) -> ClassTable:
    """Read and validate a ``classes.csv``, or a copick ``config.json``'s pickable particle
    objects."""
    path = Path(path)
    if not path.is_file():
        raise CryocapsError(f"{path}: no such classes file")
    if path.suffix.lower() == ".json":
        return CopickProject(path).class_table()
    try:
        frame = pd.read_csv(path, dtype={"name": str})
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad file
        raise CryocapsError(f"{path}: not a CSV class table ({error})") from error
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise CryocapsError(
            f"{path}: missing column(s) {', '.join(missing)}; need label,name,radius_angstrom"
        )
    if frame.empty:
        raise CryocapsError(f"{path}: no classes listed")
    return ClassTable.from_records(frame.to_dict("records"), str(path), folder=path.parent)


def write_classes(table: ClassTable, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``table`` as ``classes.csv`` at ``path`` (atomically)."""
    return write_text_atomic(path, table.to_frame().to_csv(index=False), overwrite=overwrite)


def load_class_table(
    classes_path: str | os.PathLike | None, radius_angstrom: float | None
) -> ClassTable:
    """The class table a command was given: ``--classes`` or ``--radius-angstrom``."""
    if classes_path is not None and radius_angstrom is not None:
        raise CryocapsError("give either --classes or --radius-angstrom, not both")
    if classes_path is not None:
        return read_classes(classes_path)
    if radius_angstrom is not None:
        return ClassTable.single(radius_angstrom)
    raise CryocapsError(
        "this command needs particle radii: give --classes classes.csv or --radius-angstrom"
    )


def load_class_table_beside(
    inputs: Sequence[str | os.PathLike],
    classes_path: str | os.PathLike | None,
    radius_angstrom: float | None,
) -> tuple[ClassTable, Path | None]:
    """:func:`load_class_table`, else the ``classes.csv`` beside ``inputs`` (or one folder up).

    Returns the table and the file it came from (None for ``--radius-angstrom``).
    """
    if classes_path is None and radius_angstrom is None:
        classes_path = find_class_table_beside(inputs)
        if classes_path is None:
            raise CryocapsError(
                "no class table: give --classes classes.csv (or --radius-angstrom for one class); "
                f"none found beside {inputs[0]}"
            )
    table = load_class_table(classes_path, radius_angstrom)
    return table, Path(classes_path) if classes_path is not None else None
