"""The CLI shell: help, version, fast start-up, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cryocaps import __version__
from cryocaps.cli.main import app

# The contract's commands, written out here (not read from the CLI): a command
# missing from the app, or one whose module fails to import, fails these tests.
COMMANDS = [
    "simulate",
    "preprocess",
    "make-masks",
    "train",
    "segment",
    "cluster-picks",
    "convert-picks",
    "evaluate",
    "demo",
]


def test_version(run_cli):
    result = run_cli("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_no_args_prints_help(run_cli):
    result = run_cli()
    assert "Usage" in result.output


def test_top_level_help_lists_every_command(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0, result.output
    commands_section = result.output.split("Commands:", 1)[-1]
    listed = {line.split()[0] for line in commands_section.splitlines() if line.startswith("  ")}
    missing = [name for name in COMMANDS if name not in listed]
    assert not missing, (missing, result.output)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(run_cli, name):
    result = run_cli(name, "--help")
    assert result.exit_code == 0, (name, result.output)
    assert f"Usage: cryocaps {name}" in " ".join(result.output.split())


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from cryocaps.cli.main import app\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'scipy', 'matplotlib', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout


def test_output_option_has_the_same_names_everywhere():
    import typer.main

    group = typer.main.get_command(app)
    with_o = {}
    for name, command in group.commands.items():
        for param in command.params:
            if "-o" in getattr(param, "opts", []):
                with_o[name] = set(param.opts)
    assert {"train", "segment", "cluster-picks", "evaluate"} <= set(with_o)
    for name, opts in with_o.items():
        assert opts == {"-o", "--out", "--output"}, (name, opts)
