"""The ``cryocaps`` command: one Typer app; each command lives in its own module."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer
import typer.core

from cryocaps import __version__
from cryocaps.cli.common import handle_errors, setup_logging


class _Group(typer.core.TyperGroup):
    """Options whose help already states "[default: …]" do not get Typer's second copy."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        for param in getattr(command, "params", []):
            if "[default:" in (getattr(param, "help", None) or ""):
                param.show_default = False
        return command


app = typer.Typer(
    cls=_Group,
    name="cryocaps",
    help=(
        "Find macromolecules in cryo-electron tomograms with capsule-network (3D-UCaps) "
        "and U-Net segmentation. Reads and writes MRC, RELION 3/4/5, STOPGAP, Dynamo and CSV."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# (command name, module in cryocaps.cli) in pipeline order. Modules import no
# torch/scipy/matplotlib at top level; the work is imported inside each command.
COMMANDS = [
    ("simulate", "simulate"),
    ("preprocess", "preprocess"),
    ("make-masks", "make_masks"),
    ("train", "train"),
    ("segment", "segment"),
    ("cluster-picks", "cluster_picks"),
    ("convert-picks", "convert_picks"),
    ("evaluate", "evaluate"),
    ("demo", "demo"),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryocaps {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    setup_logging()


def _register() -> None:
    for name, module_name in COMMANDS:
        module = importlib.import_module(f"cryocaps.cli.{module_name}")  # a missing module is a bug
        app.command(
            name, help=module.__doc__, no_args_is_help=getattr(module, "NO_ARGS_IS_HELP", True)
        )(handle_errors(module.command, name))


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
