"""Shared fixtures: tiny synthetic volumes and particle tables, real files from ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_FILES = SHARED / "data" / "real_files"
STRUCTURES = SHARED / "data" / "structures"


@pytest.fixture
def real_files() -> Path:
    if not REAL_FILES.is_dir():
        pytest.skip("../shared/data/real_files not present")
    return REAL_FILES


@pytest.fixture
def structures_dir() -> Path:
    if not STRUCTURES.is_dir():
        pytest.skip("../shared/data/structures not present")
    return STRUCTURES


@pytest.fixture
def sphere_volume() -> tuple[np.ndarray, pd.DataFrame]:
    """A 32³ float32 volume with three dark spheres (radius 3 voxels) in noise, and their table."""
    rng = np.random.default_rng(0)
    shape = (32, 32, 32)
    volume = rng.normal(0, 0.3, shape).astype(np.float32)
    centres = [(8, 10, 12), (20, 22, 9), (16, 8, 24)]  # (z, y, x)
    zz, yy, xx = np.indices(shape)
    for z, y, x in centres:
        volume[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 9] -= 2.0
    table = pd.DataFrame(
        {
            "tomo": "tomo_1",
            "class_name": ["a", "b", "a"],
            "x": [c[2] for c in centres],
            "y": [c[1] for c in centres],
            "z": [c[0] for c in centres],
            "score": 1.0,
        }
    )
    return volume, table


@pytest.fixture
def run_cli():
    """Run the CLI in-process; returns the click Result."""
    from typer.testing import CliRunner

    from cryocaps.cli.main import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return run
