"""The README's command blocks marked ``<!-- readme-test -->`` run as written (on tiny data).

Only sizes and budgets are shrunk, by the substitutions below, so that the
commands, flags and file names in the README cannot drift from the CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- readme-test -->"
SHRINK = {
    # 96 in-plane: the held-out slab (the last 16 voxels of Y) must hold validation particles
    "--shape 64,128,128": "--shape 40,96,96",
    "--max-minutes 5": "--max-minutes 0.05 --patch-size 32",
}


def runnable_blocks(text: str) -> list[str]:
    """Code blocks that directly follow the marker line."""
    pattern = re.compile(re.escape(MARK) + r"\s*\n```(?:bash|console)?\n(.*?)```", re.S)
    return [match.group(1) for match in pattern.finditer(text)]


def commands(block: str) -> list[str]:
    """Lines starting with '$ ' (console blocks) or every non-comment line (bash blocks)."""
    lines = block.splitlines()
    if any(line.startswith("$ ") for line in lines):
        return [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_readme_has_runnable_blocks():
    blocks = runnable_blocks(README.read_text())
    assert len(blocks) >= 2
    text = "\n".join(cmd for block in blocks for cmd in commands(block))
    for stage in (
        "simulate",
        "make-masks",
        "train",
        "segment",
        "cluster-picks",
        "evaluate",
        "convert-picks",
    ):
        assert f"cryocaps {stage}" in text, stage


def test_readme_quick_start_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = "python -m pytest -q tests"
    assert test_command in README.read_text()
    assert ci.strip().splitlines()[-1] == test_command


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if subprocess.run(["which", "cryocaps"], env=env, capture_output=True).returncode != 0:
        pytest.skip("cryocaps console script not installed")
    for block in runnable_blocks(README.read_text()):
        for command in commands(block):
            for old, new in SHRINK.items():
                command = command.replace(old, new)
            result = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
            )
            assert result.returncode == 0, f"$ {command}\n{result.stdout}\n{result.stderr}"
