"""Normalisation shared by preprocess, train and segment: clip to robust percentiles, standardise.

Statistics come from a strided sample so that a memory-mapped tomogram is
never read whole.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CLIP_PERCENTILES = (0.5, 99.5)
_SAMPLE_VOXELS = 4_000_000


def normalization_stats(data: np.ndarray, clip_percentiles=DEFAULT_CLIP_PERCENTILES) -> dict:
    """Robust statistics of a volume: clip range and mean/std after clipping.

    Returns a JSON-serialisable dict ``{"low", "high", "mean", "std"}``.
    """
    step = max(1, int(np.ceil((data.size / _SAMPLE_VOXELS) ** (1 / 3))))
    sample = np.asarray(data[::step, ::step, ::step], dtype=np.float32)
    low, high = np.percentile(sample, clip_percentiles)
    clipped = np.clip(sample, low, high)
    std = float(clipped.std())
    return {
        "low": float(low),
        "high": float(high),
        "mean": float(clipped.mean()),
        "std": std if std > 0 else 1.0,
    }


def apply_normalization(block: np.ndarray, stats: dict) -> np.ndarray:
    """Clip and standardise a block (any part of the volume) with whole-volume ``stats``."""
    out = np.clip(np.asarray(block, dtype=np.float32), stats["low"], stats["high"])
    out -= np.float32(stats["mean"])
    out /= np.float32(stats["std"])
    return out


def normalize(data: np.ndarray, clip_percentiles=DEFAULT_CLIP_PERCENTILES) -> np.ndarray:
    """Percentile-clipped zero-mean unit-std float32 copy of ``data``."""
    return apply_normalization(data, normalization_stats(data, clip_percentiles))
