"""Sliding-window segmentation of whole tomograms with bounded memory.

- :mod:`~cryocaps.inference.windows`: where the windows go (geometry, defaults, checks).
- :mod:`~cryocaps.inference.blend`: the sliding window itself and its blending.
- :mod:`~cryocaps.inference.sinks`: the :class:`BlendSink` interface the result goes
  through, an in-memory sink and one writing MRC maps.
- :mod:`~cryocaps.inference.segment`: saved models applied to MRC files, shards.
"""

from cryocaps.inference.blend import (
    BLENDING_MODES,
    DEFAULT_BATCH_SIZE,
    TTA_FLIPS,
    ProbabilityPredictor,
    axis_weights,
    sliding_window,
)
from cryocaps.inference.segment import (
    check_voxel_size,
    normalization_transform,
    segment_files,
    segment_tomogram,
    select_shard,
    unique_inputs,
)
from cryocaps.inference.sinks import ArraySink, BlendSink, MrcMapsSink
from cryocaps.inference.windows import (
    DEFAULT_OVERLAP,
    DEFAULT_PATCH_SIZE,
    AxisPlan,
    count_windows,
    overlap_overhead,
    plan_axis,
    plan_windows,
    reflect_indices,
    resolve_window,
    window_sides,
)

__all__ = [
    "BLENDING_MODES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_OVERLAP",
    "DEFAULT_PATCH_SIZE",
    "TTA_FLIPS",
    "ArraySink",
    "AxisPlan",
    "BlendSink",
    "MrcMapsSink",
    "ProbabilityPredictor",
    "axis_weights",
    "check_voxel_size",
    "count_windows",
    "normalization_transform",
    "overlap_overhead",
    "plan_axis",
    "plan_windows",
    "reflect_indices",
    "resolve_window",
    "segment_files",
    "segment_tomogram",
    "select_shard",
    "sliding_window",
    "unique_inputs",
    "window_sides",
]
