"""The architecture, checked: imports run one way, modules stay small, packages export public names.

Imports run down these layers (DESIGN.md, "Package layout"); a module may import
its own package (its unit below) or a unit of a lower rank, never one of the
same rank or higher. So stages of one rank never import each other and nothing
but the CLI imports the CLI. Function-level imports count as much as module-level
ones. Training ranks above the stages it validates with: it segments, picks and
scores held-out regions as a user's run would, through those stages' public
names only (their package, never a submodule), and none of them imports it, so
no cycle can form.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cryocaps"

# unit (first name under cryocaps) -> rank; a unit imports only itself and lower ranks
RANKS = {
    "errors": 0,  # the one user-facing exception: everything may raise it
    "cryocaps": 1,  # the package root: __version__ and CryocapsError only
    "classes": 1,  # the class table (plain data)
    "io": 2,  # files: volumes, particle formats, layout
    "runtime": 2,  # device, precision, threads, seeds, ranks, malloc
    # mid, building blocks: numerics, networks, figures, densities, run.json
    "preprocess": 3,
    "models": 3,
    "plots": 3,
    "structures": 3,
    "runinfo": 3,
    # mid, built on them: templates are rescaled by preprocess; a model file builds a model
    "masks": 4,
    "modelfile": 4,
    # stages: one job each, never importing another of their rank
    "demo": 5,
    "simulate": 5,
    "inference": 5,
    "picking": 5,
    "evaluation": 5,
    # validates as a user would run the stages above: segment, pick, score (public names only)
    "training": 6,
    "cli": 7,
}
STAGES = ("demo", "simulate", "inference", "picking", "evaluation", "training")
# Top-level modules that belong to a unit above (until they move into it).
UNIT_OF = {
    "__main__": "cli",
    "sampling": "training",  # training patches; training/sampling.py in the target layout
    "assemblies": "structures",  # built-in densities of subunit assemblies
}
NO_TORCH = ("io",)  # io/ knows nothing of torch
NOT_IN_MODELS = ("cryocaps.io", "cryocaps.modelfile", "mrcfile", "starfile")  # models know no files
SLOW_IMPORTS = ("torch", "scipy", "matplotlib")  # never at module level in cli/ (fast --help)
MAX_MODULE_LINES = 500
MAX_FUNCTION_BODY_LINES = 80
# Modules or functions allowed over the limits, each with the reason. Keep it empty if you can.
SIZE_ALLOWLIST: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> list[tuple[str, Path, ast.Module]]:
    return [
        (module_name(path), path, ast.parse(path.read_text(), filename=str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def unit(name: str) -> str:
    parts = name.split(".")
    first = parts[1] if len(parts) > 1 else "cryocaps"
    return UNIT_OF.get(first, first)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(name: str, path: Path, tree: ast.Module) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) for every import anywhere in the module."""
    module_level = _run_at_import(tree.body)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        top = id(node) in module_level
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                # "from cryocaps import runtime" imports the module cryocaps.runtime
                child = f"{base}.{alias.name}"
                found.append((node.lineno, child if _is_module(child) else base, top))
    return found


def _run_at_import(statements: list[ast.stmt]) -> set[int]:
    """Ids of the statements run when the module is imported: module level, and inside its
    if/try/with blocks (TYPE_CHECKING, fallbacks), not inside functions."""
    found = set()
    for statement in statements:
        found.add(id(statement))
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for field in ("body", "orelse", "finalbody"):
            found |= _run_at_import(getattr(statement, field, []))
        for handler in getattr(statement, "handlers", []):
            found |= _run_at_import(handler.body)
    return found


ALL = modules()


def test_every_module_has_a_layer():
    unknown = sorted({unit(name) for name, _, _ in ALL} - set(RANKS))
    assert not unknown, f"place these in RANKS (tests/test_architecture.py): {unknown}"


def test_imports_run_down_the_layers():
    violations = []
    for name, path, tree in ALL:
        source = unit(name)
        for line, target, _ in imports(name, path, tree):
            if target != "cryocaps" and not target.startswith("cryocaps."):
                continue
            destination = unit(target)
            if destination == source or RANKS.get(destination, -1) < RANKS.get(source, -1):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            ranks = f"{source} {RANKS.get(source)} -> {destination} {RANKS.get(destination)}"
            violations.append(f"{where} imports {target} (ranks {ranks})")
    assert not violations, "\n".join(violations)


def test_a_stage_uses_another_stage_by_its_public_names_only():
    violations = []
    for name, path, tree in ALL:
        source = unit(name)
        for line, target, _ in imports(name, path, tree):
            if not target.startswith("cryocaps."):
                continue
            destination = unit(target)
            if source in STAGES and destination in STAGES and destination != source:
                if target != f"cryocaps.{destination}":
                    where = f"{path.relative_to(PACKAGE.parent)}:{line}"
                    violations.append(f"{where} imports {target}, not cryocaps.{destination}")
    assert not violations, "\n".join(violations)


def test_io_knows_no_torch():
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for name, path, tree in ALL
        if unit(name) in NO_TORCH
        for line, target, _ in imports(name, path, tree)
        if target.split(".")[0] == "torch"
    ]
    assert not violations, "\n".join(violations)


def test_models_know_no_files():
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for name, path, tree in ALL
        if unit(name) == "models"
        for line, target, _ in imports(name, path, tree)
        if any(target == banned or target.startswith(banned + ".") for banned in NOT_IN_MODELS)
    ]
    assert not violations, "\n".join(violations)


def test_cli_modules_import_no_heavy_library_at_module_level():
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} at module level"
        for name, path, tree in ALL
        if unit(name) == "cli"
        for line, target, top in imports(name, path, tree)
        if top and target.split(".")[0] in SLOW_IMPORTS
    ]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_function_level_and_relative_imports():
    source = (
        "from . import draw\n"
        "from .. import classes\n"
        "def f():\n"
        "    from cryocaps import runtime\n"
        "    import torch\n"
    )
    found = imports("cryocaps.masks.make", PACKAGE / "masks" / "make.py", ast.parse(source))
    assert found == [
        (1, "cryocaps.masks.draw", True),
        (2, "cryocaps.classes", True),
        (4, "cryocaps.runtime", False),
        (5, "torch", False),
    ]
    assert unit("cryocaps.cli.train") == "cli" and unit("cryocaps") == "cryocaps"


# --------------------------------------------------------------------------- sizes


def function_body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, signature and docstring not counted (as the size check)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1 if body else 0


def test_modules_are_small():
    too_long = []
    for _, path, _ in ALL:
        relative = str(path.relative_to(PACKAGE.parent))
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and relative not in SIZE_ALLOWLIST:
            too_long.append(f"{relative}: {lines} lines")
    assert not too_long, "\n".join(too_long)


def test_functions_are_short():
    too_long = []
    for _, path, tree in ALL:
        relative = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = function_body_lines(node)
            key = f"{relative}::{node.name}"
            if lines > MAX_FUNCTION_BODY_LINES and key not in SIZE_ALLOWLIST:
                too_long.append(f"{relative}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)


def test_size_allowlist_is_not_stale():
    names = {str(path.relative_to(PACKAGE.parent)) for _, path, _ in ALL}
    stale = [key for key in SIZE_ALLOWLIST if key.partition("::")[0] not in names]
    assert not stale, f"remove from SIZE_ALLOWLIST: {stale}"


# --------------------------------------------------------------------------- public names

PACKAGES = [(name, path, tree) for name, path, tree in ALL if path.name == "__init__.py"]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("name, path, tree", PACKAGES, ids=[name for name, _, _ in PACKAGES])
def test_packages_export_public_names_only(name, path, tree):
    exported = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            exported += [alias.asname or alias.name for alias in node.names]
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exported += [element.value for element in node.value.elts]
    private = [n for n in exported if n != "annotations" and _private(n.split(".")[0])]
    assert not private, f"{path.relative_to(PACKAGE.parent)} exports {private}"
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
