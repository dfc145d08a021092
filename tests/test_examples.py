"""examples/: the pipeline scripts run on simulated data; the SLURM scripts in dry-run mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import starfile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny 'user project': two simulated tomograms with RELION 5 and STOPGAP particle files."""
    if shutil.which("cryocaps", path=_env()["PATH"]) is None:
        pytest.skip("cryocaps console script not installed")
    root = tmp_path_factory.mktemp("project")
    subprocess.run(
        [
            "cryocaps",
            "simulate",
            str(root),
            "--n-tomograms",
            "2",
            "--shape",
            "40,64,64",
            "--seed",
            "3",
        ],
        check=True,
        env=_env(),
        capture_output=True,
    )
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, particles, output, block",
    [
        ("relion5_pipeline.sh", "particles.star", "picks.star", "particles"),
        ("stopgap_pipeline.sh", "particles_stopgap.star", "picks_motl.star", "stopgap_motivelist"),
    ],
)
def test_pipeline_scripts(project, tmp_path, script, particles, output, block):
    out = tmp_path / "out"
    env = _env(
        MINUTES="0.05",
        PATCH="32",
        MODEL="unet",
        CLASSES=project / "classes.csv",
        TRAIN_ARGS="--val-tomograms tomo_02",  # tiny tomograms: a slab would hold no particle
    )
    result = subprocess.run(
        [
            "bash",
            str(EXAMPLES / script),
            str(project / particles),
            str(project / "tomograms"),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("preprocess", "make-masks", "train", "segment", "cluster-picks"):
        assert f"+ cryocaps {stage}" in result.stdout
    assert sorted(p.name for p in (out / "segmentation").glob("*_labels.mrc")) == [
        "tomo_01_labels.mrc",
        "tomo_02_labels.mrc",
    ]
    star = starfile.read(out / output, always_dict=True)
    assert block in star


def test_slurm_train_dry_run():
    result = subprocess.run(
        ["bash", str(EXAMPLES / "slurm_train.sbatch"), "tomos", "masks", "run"],
        env=_env(DRY_RUN=1, GPUS=2, RESUME=1),
        capture_output=True,
        text=True,
        check=True,
    )
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("+ torchrun --standalone --nproc-per-node 2 -m cryocaps train")
    assert "--resume" in line and "--max-minutes 1430" in line


def test_slurm_segment_array_dry_run_covers_all_shards():
    lines = []
    for task in range(4):
        result = subprocess.run(
            ["bash", str(EXAMPLES / "slurm_segment_array.sbatch"), "tomos", "run", "seg"],
            env=_env(DRY_RUN=1, SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT=4),
            capture_output=True,
            text=True,
            check=True,
        )
        lines.append(result.stdout.strip())
    assert [f"--shard {t}/4" in line for t, line in enumerate(lines)] == [True] * 4
    assert all(line.startswith("+ cryocaps segment tomos --model run") for line in lines)
