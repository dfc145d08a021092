"""What segment writes beside its maps from the model: its class table (classes.csv), the
pick-score thresholds training tuned (pick_thresholds.csv), and each class's share of a label
map against its share of the training labels (the over-segmentation check)."""

from __future__ import annotations

from pathlib import Path

from cryocaps.classes import ClassTable, oversegmented_classes, unsigned_labels
from cryocaps.errors import CryocapsError
from cryocaps.io.class_table import read_classes, write_classes
from cryocaps.io.layout import CLASS_TABLE_NAME
from cryocaps.io.thresholds import SCORE_KINDS, write_companion_thresholds
from cryocaps.io.volumes import label_counts, read_tomogram


def write_model_classes(config: dict, out_dir, overwrite: bool = False) -> Path | None:
    """Write the model's class table to ``out_dir/classes.csv`` (kept if identical)."""
    records = config.get("classes")
    if not records:
        return None
    table = ClassTable.from_records(records, "model config")
    path = Path(out_dir) / CLASS_TABLE_NAME
    if path.exists() and not overwrite:
        try:
            existing = read_classes(path)
        except CryocapsError:
            existing = None
        if existing is None or _class_rows(existing) != _class_rows(table):
            raise CryocapsError(
                f"{path} exists with other classes than the model's; pass --overwrite to replace it"
            )
        return path
    return write_classes(table, path, overwrite=True)


def write_model_thresholds(config: dict, out_dir, overwrite: bool = False) -> Path | None:
    """Write the pick-score thresholds tuned during training to ``out_dir/pick_thresholds.csv``.

    The companion file cluster-picks uses by default (both score kinds; see
    :mod:`cryocaps.io.thresholds`); None when the model has none (trained before 0.2).
    """
    thresholds = config.get("pick_thresholds")
    if not isinstance(thresholds, dict):
        return None
    kinds = {kind: thresholds.get(kind) for kind in SCORE_KINDS if thresholds.get(kind)}
    return write_companion_thresholds(kinds, out_dir, overwrite=overwrite) if kinds else None


def _class_rows(table) -> list[tuple]:
    return [
        (c.label, c.name, c.radius_angstrom, c.label_volume_angstrom3, c.label_fraction)
        for c in table
    ]


def class_coverage(label_path, config: dict) -> dict:
    """Each class's share of a written label map, and the classes that cover far more than
    their share of the training labels (``label_fraction`` in the model's class table;
    :func:`cryocaps.classes.oversegmented_classes`)."""
    records = config.get("classes")
    label_map = read_tomogram(label_path, mmap=True, check_finite=False)
    try:
        data = label_map.data
        counts = label_counts(unsigned_labels(data), 256)
    finally:
        label_map.close()
    if not records:
        return {"class_fractions": {}, "oversegmented": []}
    table = ClassTable.from_records(records, "model config")
    return {
        "class_fractions": {c.name: float(counts[c.label] / counts.sum()) for c in table},
        "oversegmented": oversegmented_classes(table, counts),
    }
