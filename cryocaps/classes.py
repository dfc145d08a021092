"""The class table: which label is which particle, and how big it is.

``classes.csv`` has the columns ``label,name,radius_angstrom`` and optionally
``template`` (path to a density map, relative to the CSV) and
``label_volume_angstrom3`` (the volume one particle of the class covers in the
training label maps, which ``make-masks`` and ``simulate`` record: a template's
envelope is a fraction of the sphere of the class radius, and picking expects
segmented particles of that size) and ``label_fraction`` (the class's share of all voxels
of the training label maps, which ``make-masks``, ``simulate`` and ``train`` record: a
class that covers far more of a segmented tomogram than that has run away over the
background). Label 0 is background and is not listed;
label 255 (:data:`IGNORE_LABEL`) marks voxels whose class is unknown (partial
annotations: ``make-masks --unannotated unknown``) and is never a class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.errors import CryocapsError

REQUIRED_COLUMNS = ("label", "name", "radius_angstrom")
MAX_LABEL = 127  # label maps are 8-bit MRC (mode 0)
# Unknown voxels of a partly annotated label map: neither a class nor background. Training
# losses skip them. Stored as the byte 0xFF (read back as -1 by readers of signed mode 0,
# as 255 by ours, which view 8-bit label maps as unsigned).
IGNORE_LABEL = 255


def unsigned_labels(label_map) -> np.ndarray:
    """A label map as an array whose values are its labels: 8-bit maps come back from MRC
    mode 0 as int8 (IGNORE_LABEL as -1), so they are viewed as uint8 (no copy)."""
    array = np.asarray(label_map)
    return array.view(np.uint8) if array.dtype == np.int8 else array


# A class covering more than this many times its share of the training label maps has run away
# over the background (issue 28: 7-10x on data a network had not seen; correct maps stay near 1x).
OVERSEGMENTED_FACTOR = 3.0


def sphere_volume_voxels(radius_voxels: float) -> float:
    """Volume of a sphere of ``radius_voxels``, in voxels."""
    return 4.0 / 3.0 * math.pi * radius_voxels**3


@dataclass(frozen=True)
class ParticleClass:
    label: int
    name: str
    radius_angstrom: float
    template: Path | None = None
    label_volume_angstrom3: float | None = None
    label_fraction: float | None = None

    def radius_voxels(self, voxel_size_angstrom: float) -> float:
        return self.radius_angstrom / voxel_size_angstrom

    def label_volume_voxels(self, voxel_size_angstrom: float) -> float:
        """Voxels one particle covers in the label maps: as recorded, else the class sphere."""
        if self.label_volume_angstrom3 is not None:
            return self.label_volume_angstrom3 / voxel_size_angstrom**3
        return sphere_volume_voxels(self.radius_voxels(voxel_size_angstrom))


class ClassTable:
    """An ordered set of :class:`ParticleClass`, looked up by label or name."""

    def __init__(self, classes: list[ParticleClass], source: str = "classes"):
        self.source = source
        labels = [c.label for c in classes]
        names = [c.name for c in classes]
        for label in labels:
            if not 1 <= label <= MAX_LABEL:
                raise CryocapsError(
                    f"{source}: label {label} out of range 1..{MAX_LABEL} (0 is background)"
                )
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise CryocapsError(f"{source}: duplicate label(s) {duplicates}")
        duplicates = sorted({x for x in names if names.count(x) > 1})
        if duplicates:
            raise CryocapsError(f"{source}: duplicate class name(s) {duplicates}")
        for c in classes:
            if not c.radius_angstrom > 0:
                raise CryocapsError(
                    f"{source}: class {c.name!r} has radius {c.radius_angstrom}; must be > 0 Å"
                )
            if c.label_volume_angstrom3 is not None and not c.label_volume_angstrom3 > 0:
                raise CryocapsError(
                    f"{source}: class {c.name!r} has label_volume_angstrom3 "
                    f"{c.label_volume_angstrom3}; must be > 0 Å³ (or empty)"
                )
            if c.label_fraction is not None and not 0 <= c.label_fraction <= 1:
                raise CryocapsError(
                    f"{source}: class {c.name!r} has label_fraction {c.label_fraction}; "
                    "must be from 0 to 1 (or empty)"
                )
        self.classes = sorted(classes, key=lambda c: c.label)

    def __iter__(self):
        return iter(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def n_labels(self) -> int:
        """Number of network outputs: background plus the highest label."""
        return max(c.label for c in self.classes) + 1

    def by_name(self, name: str) -> ParticleClass:
        for c in self.classes:
            if c.name == str(name):
                return c
        raise CryocapsError(
            f"{self.source}: unknown class {name!r}; known classes: {', '.join(self.names)}"
        )

    def by_label(self, label: int) -> ParticleClass:
        for c in self.classes:
            if c.label == int(label):
                return c
        raise CryocapsError(
            f"{self.source}: no class with label {label}; labels: {[c.label for c in self.classes]}"
        )

    def name_of(self, label_or_name) -> str:
        """Class name for a class number or name (as found in particle files)."""
        text = str(label_or_name)
        if text in self.names:
            return text
        try:
            return self.by_label(int(float(text))).name
        except (ValueError, CryocapsError):
            raise CryocapsError(
                f"{self.source}: unknown class {text!r}; known classes: {', '.join(self.names)}"
            ) from None

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.to_records())

    def with_label_volumes(self, volumes_angstrom3: dict[str, float]) -> ClassTable:
        """This table with the label volumes of the classes named in ``volumes_angstrom3``."""
        return ClassTable(
            [
                replace(c, label_volume_angstrom3=volumes_angstrom3.get(c.name))
                for c in self.classes
            ],
            self.source,
        )

    def with_label_fractions(self, fractions: dict[str, float]) -> ClassTable:
        """This table with the label fractions of the classes named in ``fractions`` (others
        keep theirs)."""
        return ClassTable(
            [replace(c, label_fraction=fractions.get(c.name, c.label_fraction)) for c in self],
            self.source,
        )

    def with_label_fractions_from_counts(self, voxels_per_label, unknown: int = 0) -> ClassTable:
        """:meth:`with_label_fractions` from voxel counts of label maps (index = label).

        ``unknown``: voxels of the maps labelled :data:`IGNORE_LABEL`. Where some are, the
        annotations are partial and a class's share of a tomogram is not known (its
        annotated share is too low by the unannotated particles): no fraction is recorded,
        and any the table had is dropped, so no over-segmentation warning rests on it.
        """
        if unknown > 0:
            return self.with_label_fractions({c.name: None for c in self})
        total = float(sum(voxels_per_label))
        if not total > 0:
            return self
        return self.with_label_fractions(
            {
                c.name: float(voxels_per_label[c.label]) / total
                for c in self
                if c.label < len(voxels_per_label)
            }
        )

    def to_records(self) -> list[dict]:
        """One dict per class; the optional columns only where a class has them."""
        return [
            {"label": c.label, "name": c.name, "radius_angstrom": c.radius_angstrom}
            | ({"template": str(c.template)} if c.template else {})
            | (
                {"label_volume_angstrom3": round(c.label_volume_angstrom3, 1)}
                if c.label_volume_angstrom3 is not None
                else {}
            )
            | ({"label_fraction": float(f"{c.label_fraction:.4g}")} if c.label_fraction else {})
            for c in self.classes
        ]

    @classmethod
    def from_records(
        cls, records: list[dict], source: str = "classes", folder: Path | None = None
    ) -> ClassTable:
        """A table from rows with the ``classes.csv`` columns (a CSV's rows, a model config's
        list); a relative template path is taken inside ``folder`` if given, else as written."""
        return cls([_class_from_record(r, source, folder) for r in records], source)

    @classmethod
    def single(cls, radius_angstrom: float, name: str = "particle") -> ClassTable:
        """A one-class table, for runs that give --radius-angstrom instead of --classes."""
        if not radius_angstrom > 0:
            raise CryocapsError(f"--radius-angstrom must be > 0, got {radius_angstrom}")
        return cls([ParticleClass(1, name, float(radius_angstrom))], "--radius-angstrom")


def _given(value) -> bool:
    """A table cell with a value (not missing, NaN or blank)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(str(value).strip())


def _class_from_record(record: dict, source: str, folder: Path | None) -> ParticleClass:
    """One class from a row with the ``classes.csv`` columns (optional ones may be absent)."""
    try:
        label = int(record["label"])
        radius = float(record["radius_angstrom"])
    except (TypeError, ValueError):
        raise CryocapsError(f"{source}: bad label/radius in row {record}") from None
    volume = record.get("label_volume_angstrom3")
    try:
        volume = float(volume) if _given(volume) else None
    except (TypeError, ValueError):
        raise CryocapsError(f"{source}: bad label_volume_angstrom3 in row {record}") from None
    fraction = record.get("label_fraction")
    try:
        fraction = float(fraction) if _given(fraction) else None
    except (TypeError, ValueError):
        raise CryocapsError(f"{source}: bad label_fraction in row {record}") from None
    template = record.get("template")
    template = Path(str(template).strip()) if _given(template) else None
    if template is not None and folder is not None and not template.is_absolute():
        template = folder / template
    return ParticleClass(label, str(record["name"]), radius, template, volume, fraction)


def oversegmented_classes(
    classes: ClassTable, voxels_per_label, factor: float = OVERSEGMENTED_FACTOR
) -> list[dict]:
    """Classes covering more than ``factor`` times their share of the training label maps.

    ``voxels_per_label`` : voxel counts of one label map (index = label). Classes without a
    recorded ``label_fraction`` are not judged. Returns one dict per such class: ``name``,
    ``fraction`` (of the map's voxels), ``expected`` (the label fraction) and ``factor``.
    """
    total = float(sum(voxels_per_label))
    found = []
    for c in classes:
        if not c.label_fraction or c.label >= len(voxels_per_label) or not total > 0:
            continue
        fraction = float(voxels_per_label[c.label]) / total
        if fraction > factor * c.label_fraction:
            found.append(
                {
                    "name": c.name,
                    "fraction": fraction,
                    "expected": c.label_fraction,
                    "factor": fraction / c.label_fraction,
                }
            )
    return found


def oversegmentation_message(where: str, found: dict) -> str:
    """The one warning line for one entry of :func:`oversegmented_classes`."""
    return (
        f"{where}: class {found['name']} covers {100 * found['fraction']:.1f}% of the tomogram, "
        f"{found['factor']:.1f}x the {100 * found['expected']:.2f}% it had in the training "
        "labels: the network may call background this class (over-segmentation); its picks "
        "are unreliable"
    )
