"""copick projects on a local filesystem: config, runs, voxel spacings, tomograms, picks files,
objects.

A copick project (https://github.com/copick/copick, filesystem backend) is a
``config.json`` and one or two roots (``overlay_root``, writable, and an optional
read-only ``static_root``) that hold the same layout::

    config.json   {"config_type": "filesystem", "overlay_root": "local:///data/proj",
                   "pickable_objects": [{"name": "ribosome", "is_particle": true,
                                         "label": 1, "radius": 150.0}, ...], ...}
    ROOT/ExperimentRuns/RUN/VoxelSpacing10.000/wbp.zarr          tomogram (OME-Zarr), per type
    ROOT/ExperimentRuns/RUN/Picks/USER_SESSION_OBJECT.json        picks of one object

cryocaps reads and writes this layout itself (see the commit that added zarr for
why not through the copick package). Names of users, sessions and objects hold no
``_`` (it separates them in file names), spaces or ``<>:"/\\|?*``. Relative roots
are taken from the current folder, as copick does.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.errors import CryocapsError

log = logging.getLogger(__name__)

LOCAL_PROTOCOLS = ("local://", "file://")
INVALID_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f\s_]')
SPACING_FOLDER = re.compile(r"^VoxelSpacing(\d+(?:\.\d+)?)$")
TOMOGRAM_SPEC = re.compile(
    r"^(?P<config>.+\.json)(?::(?P<type>[^@:]*))?(?:@(?P<spacing>[0-9]*\.?[0-9]+))?$"
)
PICKS_FOLDER = "Picks"
RUNS_FOLDER = "ExperimentRuns"


def spacing_folder_name(voxel_size_angstrom: float) -> str:
    """copick's folder name for a voxel spacing: ``VoxelSpacing10.000``."""
    return f"VoxelSpacing{voxel_size_angstrom:.3f}"


def check_copick_name(name: str, what: str) -> str:
    """Refuse a user/session/object name copick cannot store (``_`` splits its file names)."""
    if not name or INVALID_NAME.search(name):
        raise CryocapsError(
            f"{what} {name!r} is not a valid copick name (no '_', spaces or <>:\"/\\|?* allowed)"
        )
    return name


def is_copick_config(path: str | os.PathLike) -> bool:
    """True for a JSON file that looks like a copick config (pickable objects + a root)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and "pickable_objects" in config
        and ("overlay_root" in config or "config_type" in config)
    )


@dataclass(frozen=True)
class PickableObject:
    """A copick pickable object: name, segmentation label, radius (Å, may be unknown)."""

    name: str
    label: int
    radius_angstrom: float | None
    is_particle: bool = True


@dataclass(frozen=True)
class PicksFile:
    """One picks file: ``RUN/Picks/USER_SESSION_OBJECT.json`` under one of the roots."""

    path: Path
    run: str
    user: str
    session: str
    object_name: str


@dataclass(frozen=True)
class CopickSelection:
    """What a command takes from (or writes into) a copick project.

    Attributes
    ----------
    user, session : ``--copick-user`` / ``--copick-session`` (None: any, when reading)
    objects : ``--copick-objects`` names (None: every object)
    voxel_size_angstrom : the voxel spacing positions are counted in (None: each run's only one)
    """

    user: str | None = None
    session: str | None = None
    objects: tuple[str, ...] | None = None
    voxel_size_angstrom: float | None = None


def _root_path(value, config_path: Path, key: str) -> Path:
    text = str(value)
    for protocol in LOCAL_PROTOCOLS:
        if text.startswith(protocol):
            text = text[len(protocol) :]
            break
    else:
        if "://" in text:
            raise CryocapsError(
                f"{config_path}: {key} {value!r} is not on the local filesystem; "
                "cryocaps reads copick projects from local folders only"
            )
    return Path(text).expanduser().absolute()


class CopickProject:
    """A copick project's config and folder layout (nothing is read until asked)."""

    def __init__(self, config_path: str | os.PathLike):
        self.config_path = Path(config_path)
        try:
            config = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise CryocapsError(f"{self.config_path}: no such copick config") from None
        except (OSError, ValueError) as error:
            raise CryocapsError(
                f"{self.config_path}: not a readable copick config ({error})"
            ) from None
        if not isinstance(config, dict) or "pickable_objects" not in config:
            raise CryocapsError(f"{self.config_path}: not a copick config (no pickable_objects)")
        kind = config.get("config_type", "filesystem")
        if kind != "filesystem":
            raise CryocapsError(
                f"{self.config_path}: copick config_type {kind!r}; "
                "cryocaps reads 'filesystem' projects only"
            )
        if "overlay_root" not in config:
            raise CryocapsError(f"{self.config_path}: copick config has no overlay_root")
        self.config = config
        self.overlay_root = _root_path(config["overlay_root"], self.config_path, "overlay_root")
        static = config.get("static_root")
        self.static_root = _root_path(static, self.config_path, "static_root") if static else None
        self.objects = [
            pickable_object(entry, self.config_path) for entry in config["pickable_objects"]
        ]

    # --- layout ------------------------------------------------------------------
    @property
    def roots(self) -> list[Path]:
        """Overlay root first (it wins when both hold a file), then the static root if it
        differs."""
        roots = [self.overlay_root]
        if self.static_root is not None and self.static_root != self.overlay_root:
            roots.append(self.static_root)
        return roots

    def runs(self) -> list[str]:
        names = set()
        for root in self.roots:
            folder = root / RUNS_FOLDER
            if folder.is_dir():
                names.update(
                    p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                )
        return sorted(names)

    def run_folders(self, run: str) -> list[Path]:
        return [
            root / RUNS_FOLDER / run for root in self.roots if (root / RUNS_FOLDER / run).is_dir()
        ]

    def voxel_spacings(self, run: str) -> list[float]:
        spacings = set()
        for folder in self.run_folders(run):
            for child in folder.iterdir():
                match = SPACING_FOLDER.match(child.name)
                if match and child.is_dir():
                    spacings.add(round(float(match.group(1)), 3))
        return sorted(spacings)

    def tomograms(self, run: str, voxel_size_angstrom: float) -> dict[str, Path]:
        """``{tomogram type: .zarr path}`` of a run at one voxel spacing (overlay first)."""
        found: dict[str, Path] = {}
        for folder in self.run_folders(run):
            spacing = folder / spacing_folder_name(voxel_size_angstrom)
            if spacing.is_dir():
                for image in sorted(spacing.glob("*.zarr")):
                    found.setdefault(image.name[: -len(".zarr")], image)
        return found

    def picks_files(self, selection: CopickSelection | None = None) -> list[PicksFile]:
        """Every picks file of the project matching the selection's user, session and objects."""
        selection = selection or CopickSelection()
        if selection.objects is not None:
            for name in selection.objects:
                self.object(name)
        files: dict[tuple[str, str], PicksFile] = {}
        for run in self.runs():
            for folder in self.run_folders(run):
                for path in sorted((folder / PICKS_FOLDER).glob("*.json")):
                    parts = path.name[: -len(".json")].split("_")
                    if path.name.startswith(".") or len(parts) != 3:
                        continue
                    picks = PicksFile(path, run, *parts)
                    if (
                        selection.user not in (None, picks.user)
                        or selection.session not in (None, picks.session)
                        or (
                            selection.objects is not None
                            and picks.object_name not in selection.objects
                        )
                    ):
                        continue
                    files.setdefault((run, path.name), picks)
        return list(files.values())

    def picks_path(self, run: str, user: str, session: str, object_name: str) -> Path:
        """Where cryocaps writes a picks file: in the overlay root, as copick does."""
        return (
            self.overlay_root
            / RUNS_FOLDER
            / run
            / PICKS_FOLDER
            / f"{user}_{session}_{object_name}.json"
        )

    # --- objects and classes ---------------------------------------------------------
    def object(self, name: str) -> PickableObject:
        for obj in self.objects:
            if obj.name == name:
                return obj
        known = ", ".join(o.name for o in self.objects) or "none"
        raise CryocapsError(f"{self.config_path}: no pickable object {name!r} (objects: {known})")

    def class_table(self, objects: tuple[str, ...] | None = None) -> ClassTable:
        """The pickable particle objects (or ``objects``) as a class table: label, name, radius."""
        chosen = (
            [self.object(n) for n in objects]
            if objects
            else [o for o in self.objects if o.is_particle]
        )
        if not chosen:
            raise CryocapsError(f"{self.config_path}: no pickable particle objects")
        classes = []
        for obj in chosen:
            if obj.radius_angstrom is None:
                raise CryocapsError(
                    f"{self.config_path}: pickable object {obj.name!r} has no radius; "
                    "give --classes classes.csv"
                )
            classes.append(ParticleClass(obj.label, obj.name, obj.radius_angstrom))
        return ClassTable(classes, source=str(self.config_path))

    def with_classes(self, classes: ClassTable) -> dict | None:
        """The config with ``classes`` added as pickable particle objects (None: all there already).

        An object of a class's name stays as the project has it (a different label or
        radius is logged); a new class whose label another object has is refused.
        Names must be valid copick names.
        """
        from cryocaps.io.volumes import same_voxel_size

        entries = [dict(entry) for entry in self.config["pickable_objects"]]
        by_label = {obj.label: obj.name for obj in self.objects}
        added = False
        for particle in classes:
            check_copick_name(particle.name, f"{classes.source}: class")
            known = next((o for o in self.objects if o.name == particle.name), None)
            if known is not None:
                if known.label != particle.label or (
                    known.radius_angstrom is not None
                    and not same_voxel_size(known.radius_angstrom, particle.radius_angstrom)
                ):
                    log.warning(
                        "%s: object %r has label %s, radius %s Å (kept); %s says %s, %g Å",
                        self.config_path,
                        particle.name,
                        known.label,
                        known.radius_angstrom,
                        classes.source,
                        particle.label,
                        particle.radius_angstrom,
                    )
                continue
            if particle.label in by_label:
                raise CryocapsError(
                    f"{self.config_path}: label {particle.label} of class {particle.name!r} "
                    f"is object {by_label[particle.label]!r}'s"
                )
            entries.append(
                {
                    "name": particle.name,
                    "is_particle": True,
                    "label": particle.label,
                    "radius": float(particle.radius_angstrom),
                }
            )
            by_label[particle.label] = particle.name
            added = True
        return {**self.config, "pickable_objects": entries} if added else None

    # --- voxel spacing of a run ----------------------------------------------------
    def spacing(self, run: str, requested: float | None, where) -> float:
        """The voxel spacing (Å) positions of ``run`` are counted in.

        ``requested`` (``--voxel-size-angstrom``) must be one of the run's spacings
        when it has any; without it the run must have exactly one.
        """
        from cryocaps.io.volumes import same_voxel_size

        spacings = self.voxel_spacings(run)
        listed = ", ".join(f"{s:g}" for s in spacings)
        if requested is not None:
            if not (np.isfinite(requested) and requested > 0):
                raise CryocapsError(f"--voxel-size-angstrom must be > 0, got {requested}")
            if spacings and not any(same_voxel_size(s, requested) for s in spacings):
                raise CryocapsError(
                    f"{where}: run {run!r} has no voxel spacing {requested:g} Å (it has {listed} Å)"
                )
            return float(requested)
        if len(spacings) == 1:
            return spacings[0]
        if not spacings:
            raise CryocapsError(
                f"{where}: run {run!r} has no VoxelSpacing folder; give --voxel-size-angstrom"
            )
        raise CryocapsError(
            f"{where}: run {run!r} has voxel spacings {listed} Å; "
            "choose one with --voxel-size-angstrom"
        )


def add_classes_to_config(config_path: str | os.PathLike, classes: ClassTable) -> bool:
    """Add the classes a copick project lacks as pickable objects (config rewritten atomically)."""
    from cryocaps.io.files import write_text_atomic

    config = CopickProject(config_path).with_classes(classes)
    if config is None:
        return False
    write_text_atomic(config_path, json.dumps(config, indent=4) + "\n", overwrite=True)
    return True


def parse_tomogram_spec(text: str | os.PathLike) -> tuple[Path, str | None, float | None] | None:
    """``CONFIG.json[:TYPE][@SPACING]`` -> (config, type, spacing Å), or None for other paths.

    ``project/config.json:wbp@10`` names the ``wbp`` tomogram at 10 Å of every run.
    """
    match = TOMOGRAM_SPEC.match(str(text))
    if match is None or not is_copick_config(match.group("config")):
        return None
    spacing = match.group("spacing")
    return (
        Path(match.group("config")),
        match.group("type") or None,
        float(spacing) if spacing else None,
    )


def project_tomograms(
    config_path: str | os.PathLike,
    tomo_type: str | None = None,
    voxel_size_angstrom: float | None = None,
    flag: str = "--tomograms",
) -> list[Path]:
    """The ``.zarr`` tomogram of every run that has one of ``tomo_type`` at ``voxel_size_angstrom``.

    Either may be left out when the project holds one kind only; runs without
    that tomogram are left out (logged).
    """
    from cryocaps.io.volumes import same_voxel_size

    project = CopickProject(config_path)
    kinds: dict[tuple[float, str], dict[str, Path]] = {}
    runs = project.runs()
    for run in runs:
        for spacing in project.voxel_spacings(run):
            if voxel_size_angstrom is not None and not same_voxel_size(
                spacing, voxel_size_angstrom
            ):
                continue
            for kind, path in project.tomograms(run, spacing).items():
                if tomo_type is None or kind == tomo_type:
                    kinds.setdefault((spacing, kind), {})[run] = path
    asked = (
        f"{' of type ' + tomo_type if tomo_type else ''}"
        f"{f' at {voxel_size_angstrom:g} Å' if voxel_size_angstrom else ''}"
    )
    if not kinds:
        raise CryocapsError(f"{flag} {config_path}: the copick project has no tomograms{asked}")
    if len(kinds) > 1:
        listed = ", ".join(f"{kind}@{spacing:g}" for spacing, kind in sorted(kinds))
        raise CryocapsError(
            f"{flag} {config_path}: the project has tomograms {listed}; "
            f"name one as {config_path}:TYPE@SPACING"
        )
    by_run = next(iter(kinds.values()))
    missing = [run for run in runs if run not in by_run]
    if missing:
        log.info("%s: runs without that tomogram left out: %s", config_path, ", ".join(missing))
    return [by_run[run] for run in sorted(by_run)]


def copick_run_of(path: str | os.PathLike) -> str | None:
    """The run a copick tomogram belongs to:
    ``.../ExperimentRuns/RUN/VoxelSpacing10.000/wbp.zarr`` -> RUN."""
    path = Path(path)
    spacing, run = path.parent, path.parent.parent
    if SPACING_FOLDER.match(spacing.name) and run.parent.name == RUNS_FOLDER:
        return run.name
    return None


def pickable_object(entry, config_path: Path) -> PickableObject:
    """One ``pickable_objects`` entry of a config, checked."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise CryocapsError(f"{config_path}: a pickable object without a name: {entry!r}")
    radius = entry.get("radius")
    try:
        label = int(entry.get("label", 1) if entry.get("label") is not None else 1)
        radius = float(radius) if radius is not None else None
    except (TypeError, ValueError):
        raise CryocapsError(
            f"{config_path}: pickable object {entry['name']!r}: bad label or radius"
        ) from None
    return PickableObject(str(entry["name"]), label, radius, bool(entry.get("is_particle", True)))
