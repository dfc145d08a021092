"""The CLI shell: help, version, fast start-up, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from cryocaps import __version__
from cryocaps.cli.main import COMMANDS, app


def test_version(run_cli):
    result = run_cli("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_no_args_prints_help(run_cli):
    result = run_cli()
    assert "Usage" in result.output


def test_every_registered_command_has_help(run_cli):
    registered = [c.name for c in app.registered_commands]
    assert registered, "no command registered"
    for name in registered:
        result = run_cli(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


def test_command_list_is_known():
    names = {c.name for c in app.registered_commands}
    assert names <= {name for name, _ in COMMANDS}


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
