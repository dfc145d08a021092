"""What every command shares: options, logging, error handling, progress, console.

Nothing here imports torch, scipy or matplotlib: ``cryocaps --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cryocaps.errors import CryocapsError

console = Console(stderr=True, highlight=False)
stdout_console = Console(highlight=False)
log = logging.getLogger("cryocaps")

# --- number checks Typer runs while parsing ----------------------------------
# Declared on each numeric option as its callback. Not Typer's min=/max=: NaN passes
# click's ranges, they have no open bounds, and newer Typers word their refusal without
# the value typed.


class OutOfRange(typer.BadParameter):
    """A refused option value, shown as one red line worded like the library's checks:
    ``Error: --lr inf: not a finite number`` (click's would add the usage and a hint)."""

    def format_message(self) -> str:
        return self.message

    def show(self, file=None) -> None:
        console.print(f"[bold red]Error:[/] {_escape(self.format_message())}", soft_wrap=True)


def in_range(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable:
    """A Typer callback refusing NaN, ±inf and numbers outside ``[low, high]`` (an open end
    with ``low_open``/``high_open``), naming the flag and the value."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    wanted = " and ".join(bounds)

    def check(ctx, param, value):  # untyped: Typer passes context, parameter, value by position
        if value is None:
            return value
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if isinstance(value, float) and not math.isfinite(value):  # ints are all finite
            raise OutOfRange(f"{flag} {value}: not a finite number", ctx=ctx, param=param)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise OutOfRange(f"{flag} {value}: must be {wanted}", ctx=ctx, param=param)
        return value

    return check


finite = in_range()
positive = in_range(0, low_open=True)

SEED_MAX = 2**32 - 1  # numpy's legacy generator takes seeds below 2**32

# --- options shared by commands (declare with these types) -----------------
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
OutDir = Annotated[
    Path,
    typer.Option(
        "--out", "--output", "-o", help="Output folder (created if missing).", show_default=False
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only print warnings and errors.")]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print debug messages and full tracebacks.")
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help="Torch device: auto (CUDA if available, else CPU), cpu, cuda, cuda:1 … "
        "[default: auto]",
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed",
        callback=in_range(0, SEED_MAX),
        help=f"Random seed (numpy, torch, python), 0 to {SEED_MAX}. [default: 0]",
    ),
]
VoxelSize = Annotated[
    float | None,
    typer.Option(
        "--voxel-size-angstrom",
        callback=positive,
        help="Voxel size in Å: overrides the MRC header (needed when it says 0); picks the scale "
        "level of an OME-Zarr image; the voxel spacing of copick picks. [default: from the files]",
    ),
]
ClassesOption = Annotated[
    Path | None,
    typer.Option(
        "--classes",
        help="Class table classes.csv (label,name,radius_angstrom[,template]).",
    ),
]
RadiusOption = Annotated[
    float | None,
    typer.Option(
        "--radius-angstrom",
        callback=positive,
        help="Particle radius in Å for a single-class run (instead of --classes).",
    ),
]
OutputFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="Output format: relion5, relion4, relion3, stopgap, dynamo, csv, or copick (picks "
        "written into the copick project whose config.json is -o, as "
        "--copick-user/--copick-session). [default: from the extension of -o: .star relion5, "
        ".tbl dynamo, .csv csv, a copick config.json copick]",
    ),
]
CopickUser = Annotated[
    str | None,
    typer.Option(
        "--copick-user",
        help="copick user: whose picks a copick config.json input gives, and (needed) whom "
        "--format copick writes as. [default: every user's]",
        show_default=False,
    ),
]
CopickSession = Annotated[
    str | None,
    typer.Option(
        "--copick-session",
        help="copick session: which session's picks a copick config.json input gives, and "
        "(needed) the new session --format copick writes. [default: every session's]",
        show_default=False,
    ),
]
CopickObjects = Annotated[
    str | None,
    typer.Option(
        "--copick-objects",
        help="Comma-separated copick pickable objects: the picks read from a copick config.json, "
        "and the classes of --classes config.json. [default: every (particle) object]",
        show_default=False,
    ),
]
CoordsPixelSize = Annotated[
    float | None,
    typer.Option(
        "--coords-pixel-size-angstrom",
        callback=positive,
        help="Pixel size (Å) of the coordinates in RELION 3/4, STOPGAP and Dynamo files read "
        "(and written), when it is not the tomograms' voxel size (e.g. bin-1 coordinates). "
        "[default: rlnTomoTiltSeriesPixelSize for RELION 4, else the tomograms' voxels]",
        show_default=False,
    ),
]

_state = {"verbose": False, "quiet": False}


def _log_handler():
    """Rich's handler on a terminal; elsewhere (cluster logs, pipes) one plain line per record,
    which rich would wrap and pad at its default 80 columns."""
    from rich.logging import RichHandler

    class LineHandler(RichHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if self.console.is_terminal:
                super().emit(record)
                return
            try:
                line = " ".join(self.format(record).split("\n"))
                self.console.file.write(f"{record.levelname:<8} {line}\n")
                self.console.file.flush()
            except Exception:  # noqa: BLE001 - logging must never raise
                self.handleError(record)

    return LineHandler(
        console=console, show_time=False, show_path=False, markup=False, rich_tracebacks=False
    )


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Configure the ``cryocaps`` logger once per process (rich handler on stderr)."""
    from rich.logging import RichHandler

    _state["verbose"] = _state["verbose"] or verbose
    _state["quiet"] = quiet and not verbose
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("cryocaps")
    root.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        handler = _log_handler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.propagate = False
    for handler in root.handlers:
        handler.setLevel(level)


def is_quiet() -> bool:
    return _state["quiet"]


def fail(message: str, code: int = 2) -> None:
    """Print one red line and exit."""
    console.print(f"[bold red]Error:[/] {_escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text.replace("\n", " "))


# What each command can change to need less memory (its own options only).
MEMORY_HINTS = {
    "simulate": "a smaller --shape or --n-particles",
    "preprocess": "fewer or smaller tomograms, or a larger --voxel-size-angstrom",
    "make-masks": "fewer tomograms at a time",
    "train": "a smaller --batch-size or --patch-size",
    "segment": "a smaller --batch-size or --patch-size",
    "cluster-picks": "fewer label maps at a time, or --method components",
    "convert-picks": "fewer particle files at a time",
    "evaluate": "fewer particle files at a time",
    "demo": "a smaller --shape or --patch-size",
}


def handle_errors(function: Callable, name: str | None = None) -> Callable:
    """Turn what bad input raises into one red line (traceback with --verbose).

    :class:`CryocapsError` and :class:`OSError` (with its path) exit with code 2,
    MemoryError with 1 (the input was fine; the machine was too small), with a hint
    that fits command ``name``. A ValueError or TypeError that got this far comes from
    a value no check caught: it still gets one line, naming the command, and says so.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        command = f"cryocaps {name or _command_name()}"
        try:
            return function(*args, **kwargs)
        except CryocapsError as error:
            _traceback_if_verbose()
            fail(str(error), 2)
        except KeyboardInterrupt:
            console.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None
        except MemoryError as error:
            _traceback_if_verbose()
            fail(memory_message(name or _command_name(), error), 1)
        except OSError as error:
            _traceback_if_verbose()
            fail(os_error_message(error, command), 2)
        except (ValueError, TypeError) as error:
            _traceback_if_verbose()
            fail(
                f"{command}: {type(error).__name__}: {error} (a value no check caught: please "
                "report it; --verbose shows where)",
                2,
            )

    return wrapper


def _command_name() -> str:
    import click

    context = click.get_current_context(silent=True)
    return context.info_name if context is not None and context.info_name else "command"


def _traceback_if_verbose() -> None:
    if _state["verbose"]:
        console.print_exception()


def memory_message(command: str, error: MemoryError) -> str:
    """``cryocaps COMMAND: out of memory (...); try <what this command can change>``."""
    detail = str(error).splitlines()[0] if str(error) else ""
    hint = MEMORY_HINTS.get(command)
    return (
        f"cryocaps {command}: out of memory"
        + (f" ({detail})" if detail else "")
        + (f"; try {hint}" if hint else "")
    )


def os_error_message(error: OSError, command: str) -> str:
    """``PATH: reason`` (``PATH -> PATH2: reason`` for renames), else ``COMMAND: reason``."""
    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    if error.filename is None:
        return f"{command}: {reason}"
    where = os.fsdecode(error.filename)
    if error.filename2 is not None:
        where += f" -> {os.fsdecode(error.filename2)}"
    return f"{where}: {reason}"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["cryocaps", *sys.argv[1:]])


def progress_enabled() -> bool:
    return console.is_terminal and not _state["quiet"] and not os.environ.get("CI")


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A rich progress bar; yields ``advance(n=1, **fields)``. Silent off a terminal."""
    if not progress_enabled():
        yield lambda *a, **k: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance


def print_table(title: str, columns: list[str], rows: list[list], to_stdout: bool = True) -> None:
    """A rich table (on stdout by default, so it can be captured)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_format(v) for v in row])
    (stdout_console if to_stdout else console).print(table)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def copick_selection(
    user: str | None,
    session: str | None,
    objects: str | None,
    voxel_size_angstrom: float | None = None,
):
    """The ``--copick-*`` options (and the voxel spacing) as a ``CopickSelection`` (None if
    none given)."""
    from cryocaps.io.copick_project import CopickSelection

    names = tuple(n.strip() for n in objects.split(",") if n.strip()) if objects else None
    if objects is not None and not names:
        raise CryocapsError(f"--copick-objects {objects!r}: no object names")
    if user is None and session is None and names is None and voxel_size_angstrom is None:
        return None
    return CopickSelection(user, session, names, voxel_size_angstrom)


def narrow_classes(table, copick_objects: str | None):
    """``table`` restricted to the ``--copick-objects`` names (labels kept), or as it is."""
    from cryocaps.classes import ClassTable

    if not copick_objects:
        return table
    names = copick_selection(None, None, copick_objects).objects
    return ClassTable([table.by_name(name) for name in names], table.source)


def collect_mrc_files(paths: list[Path], flag: str = "input") -> list[Path]:
    """Expand folders into their MRC files and .zarr images (sorted), a copick
    ``config.json[:TYPE][@SPACING]`` into its runs' tomograms; check every path exists."""
    from cryocaps.io.layout import expand_volume_paths

    return expand_volume_paths(paths, flag)
