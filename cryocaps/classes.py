"""The class table: which label is which particle, and how big it is.

``classes.csv`` has the columns ``label,name,radius_angstrom`` and optionally
``template`` (path to a density map, relative to the CSV). Label 0 is
background and is not listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cryocaps.errors import CryocapsError

REQUIRED_COLUMNS = ("label", "name", "radius_angstrom")
MAX_LABEL = 127  # label maps are 8-bit MRC (mode 0)


@dataclass(frozen=True)
class ParticleClass:
    label: int
    name: str
    radius_angstrom: float
    template: Path | None = None

    def radius_voxels(self, voxel_size_angstrom: float) -> float:
        return self.radius_angstrom / voxel_size_angstrom


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
        rows = [
            {"label": c.label, "name": c.name, "radius_angstrom": c.radius_angstrom}
            | ({"template": str(c.template)} if c.template else {})
            for c in self.classes
        ]
        return pd.DataFrame(rows)

    def to_records(self) -> list[dict]:
        return self.to_frame().to_dict(orient="records")

    @classmethod
    def from_records(cls, records: list[dict], source: str = "classes") -> ClassTable:
        return cls(
            [
                ParticleClass(
                    int(r["label"]),
                    str(r["name"]),
                    float(r["radius_angstrom"]),
                    Path(r["template"]) if r.get("template") else None,
                )
                for r in records
            ],
            source,
        )

    @classmethod
    def single(cls, radius_angstrom: float, name: str = "particle") -> ClassTable:
        """A one-class table, for runs that give --radius-angstrom instead of --classes."""
        if not radius_angstrom > 0:
            raise CryocapsError(f"--radius-angstrom must be > 0, got {radius_angstrom}")
        return cls([ParticleClass(1, name, float(radius_angstrom))], "--radius-angstrom")
