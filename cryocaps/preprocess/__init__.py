"""Preprocessing: normalisation (shared by train and segment), rescaling, filters.

Normalisation is the same everywhere: clip to robust percentiles, then zero
mean and unit standard deviation.

- :mod:`~cryocaps.preprocess.normalization`: robust statistics, clip and standardise
- :mod:`~cryocaps.preprocess.fourier`: Fourier rescaling (any ratio) and soft band-pass filters
- :mod:`~cryocaps.preprocess.pipeline`: option checks, one volume, MRC files to MRC files
"""

from cryocaps.preprocess.fourier import (
    bandpass_filter,
    effective_voxel_sizes,
    fourier_rescale,
    rescaled_shape,
)
from cryocaps.preprocess.normalization import (
    DEFAULT_CLIP_PERCENTILES,
    apply_normalization,
    normalization_stats,
    normalize,
)
from cryocaps.preprocess.pipeline import (
    FilePlan,
    PreprocessOptions,
    check_preprocess_options,
    plan_files,
    preprocess_file,
    preprocess_files,
    preprocess_volume,
)

__all__ = [
    "DEFAULT_CLIP_PERCENTILES",
    "FilePlan",
    "PreprocessOptions",
    "apply_normalization",
    "bandpass_filter",
    "check_preprocess_options",
    "effective_voxel_sizes",
    "fourier_rescale",
    "normalization_stats",
    "normalize",
    "plan_files",
    "preprocess_file",
    "preprocess_files",
    "preprocess_volume",
    "rescaled_shape",
]
