"""Score picks against ground truth, at the particle and the voxel level.

- :mod:`~cryocaps.evaluation.particles`: one-to-one matching of picks to particles,
  P/R/F1/F-beta, duplicates and class confusions, precision-recall over pick
  scores, best-F1 score thresholds;
- :mod:`~cryocaps.evaluation.voxels`: Dice per class between label maps, voxel AUPRC;
- :mod:`~cryocaps.evaluation.report`: from particle files and label maps to the
  report folder (JSON, CSV tables, PR curves, overlays).
"""

from cryocaps.evaluation.particles import (
    BACKGROUND,
    MISSED,
    Matching,
    best_score_thresholds,
    confusion_table,
    evaluate_picks,
    fbeta_score,
    match_picks,
    pick_precision_recall,
    precision_recall,
    summarize,
    voxel_size_of,
)
from cryocaps.evaluation.report import (
    REPORT_FILES,
    VOXEL_REPORT_NAME,
    ParticleReport,
    VoxelReport,
    evaluate_files,
    overlay_panels,
    read_pick_file,
    voxel_report,
    write_report,
)
from cryocaps.evaluation.voxels import (
    VoxelScores,
    background_counts,
    evaluate_label_files,
    label_map_files,
    voxel_metrics,
)

__all__ = [
    "BACKGROUND",
    "MISSED",
    "REPORT_FILES",
    "VOXEL_REPORT_NAME",
    "Matching",
    "ParticleReport",
    "VoxelReport",
    "VoxelScores",
    "background_counts",
    "best_score_thresholds",
    "confusion_table",
    "evaluate_files",
    "evaluate_label_files",
    "evaluate_picks",
    "fbeta_score",
    "label_map_files",
    "match_picks",
    "overlay_panels",
    "pick_precision_recall",
    "precision_recall",
    "read_pick_file",
    "summarize",
    "voxel_metrics",
    "voxel_report",
    "voxel_size_of",
    "write_report",
]
