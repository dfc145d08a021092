"""A simulated data set on disk: tomograms, label maps, particle files, class table, templates."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from cryocaps.assemblies import named_templates
from cryocaps.classes import ClassTable, ParticleClass
from cryocaps.errors import CryocapsError
from cryocaps.io.class_table import write_classes
from cryocaps.io.files import check_folder
from cryocaps.simulate.parameters import SimulationParameters, check_box, check_parameters
from cryocaps.simulate.tomogram import SimulatedTomogram, simulate_tomogram
from cryocaps.structures import ParticleTemplate, load_structure_templates

log = logging.getLogger(__name__)

__all__ = [
    "PARTICLE_FILES",
    "class_table",
    "load_templates",
    "output_paths",
    "simulate_dataset",
    "tomogram_names",
]

PARTICLE_FILES = {  # file name -> format of cryocaps.io.particles
    "particles.csv": "csv",
    "particles.star": "relion5",
    "particles_stopgap.star": "stopgap",
}
STRUCTURE_PREFERENCES = ("maps", "models")
CONVENTIONS = {  # recorded in run.json beside the data
    "snr": "variance of the CTF-modulated projections of the particles alone (all tilt "
    "images, whole detector) / variance of the added white noise",
    "angles": "RELION ZYZ rot, tilt, psi in degrees: a particle is its class density "
    "rotated by A = Euler_angles2matrix(rot, tilt, psi), particle(x) = density(A.T x)",
    "tilt_axis": "Y; tilt θ sees (x, z) from the centre at detector u = x cos θ + z sin θ",
    "contrast": "protein dark (CTF with underfocus); tomograms standardised to mean 0, std 1",
}


def load_templates(
    voxel_size_angstrom: float,
    structures: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    prefer: str = "maps",
) -> list[ParticleTemplate]:
    """Built-in classes (by name also assemblies), or the maps/models in ``structures``
    (optionally only ``names``).

    ``prefer`` ("maps" or "models") picks the file of a class that has both.
    """
    if prefer not in STRUCTURE_PREFERENCES:
        raise CryocapsError(f"--prefer {prefer!r}: use maps or models")
    if structures is None:
        return named_templates(voxel_size_angstrom, names)
    return load_structure_templates(structures, voxel_size_angstrom, names=names, prefer=prefer)


def class_table(templates: Sequence[ParticleTemplate], with_templates: bool = False) -> ClassTable:
    """Labels 1..K in template order, radii measured from the densities.

    With ``with_templates`` each class names its density map ``templates/<name>.mrc``
    (relative to classes.csv), for ``make-masks --shape template``.
    """
    return ClassTable(
        [
            ParticleClass(
                k + 1,
                t.name,
                round(t.radius_angstrom, 1),
                Path("templates", f"{t.name}.mrc") if with_templates else None,
            )
            for k, t in enumerate(templates)
        ],
        "simulated classes",
    )


def tomogram_names(n: int) -> list[str]:
    """``tomo_01`` … ``tomo_NN`` (at least two digits, as many as ``n`` needs)."""
    width = max(2, len(str(n)))
    return [f"tomo_{i + 1:0{width}d}" for i in range(n)]


def output_paths(
    out_dir: Path, n_tomograms: int, preview: bool = False, class_names: Sequence[str] = ()
) -> list[Path]:
    """Every file :func:`simulate_dataset` writes into ``out_dir``."""
    names = tomogram_names(n_tomograms)
    paths = [out_dir / name for name in PARTICLE_FILES] + [
        out_dir / "tomograms.star",
        out_dir / "classes.csv",
    ]
    paths += [out_dir / "templates" / f"{name}.mrc" for name in class_names]
    paths += [out_dir / "tomograms" / f"{n}.mrc" for n in names]
    paths += [out_dir / "labels" / f"{n}.mrc" for n in names]
    if preview:
        paths += [out_dir / f"preview_{n}.png" for n in names]
    return paths


def simulate_dataset(
    out_dir: str | os.PathLike,
    templates: Sequence[ParticleTemplate],
    params: SimulationParameters,
    *,
    overwrite: bool = False,
    preview: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Simulate ``params.n_tomograms`` tomograms and write them with their ground truth.

    Writes ``tomograms/<name>.mrc``, ``labels/<name>.mrc``, ``particles.csv``,
    ``particles.star`` (RELION 5) with ``tomograms.star``, ``particles_stopgap.star``,
    ``templates/<class>.mrc`` (each class's density), ``classes.csv`` (and
    ``preview_<name>.png`` with ``preview``) into ``out_dir``; returns a summary
    (paths, counts per tomogram and per class, timings) for run.json.
    """
    out_dir = Path(out_dir)
    check_parameters(params)
    check_box(params, templates)
    _check_outputs(
        out_dir,
        output_paths(out_dir, params.n_tomograms, preview, [t.name for t in templates]),
        overwrite,
    )
    table = class_table(templates, with_templates=True)
    if params.label_shape == "template":  # picking then expects envelopes, not spheres
        table = table.with_label_volumes({t.name: t.envelope_volume_angstrom3 for t in templates})
    seeds = np.random.SeedSequence(params.seed).spawn(params.n_tomograms)
    outputs, tables, details = [], [], {}
    voxels_per_label = np.zeros(table.n_labels, dtype=np.int64)
    for name, seed in zip(tomogram_names(params.n_tomograms), seeds, strict=True):
        started = time.perf_counter()
        result = simulate_tomogram(templates, params, np.random.default_rng(seed), name)
        outputs += _write_tomogram(out_dir, result, params.voxel_size_angstrom, preview, overwrite)
        tables.append(result.particles)
        voxels_per_label += np.bincount(result.labels.ravel(), minlength=table.n_labels)[
            : table.n_labels
        ]
        result.details["seconds"] = time.perf_counter() - started
        details[name] = result.details
        log.info(
            "%s: %d particles in %.1f s",
            name,
            result.details["n_particles"],
            result.details["seconds"],
        )
        if progress is not None:
            progress(f"{name}: {result.details['n_particles']} particles")
    particles = pd.concat(tables, ignore_index=True)
    table = table.with_label_fractions_from_counts(voxels_per_label)
    outputs += _write_tables(out_dir, particles, table, templates, params, list(details), overwrite)
    return {
        "outputs": [str(p) for p in outputs],
        "classes": table.to_records(),
        "class_sources": {t.name: t.source for t in templates},
        "tomograms": details,
        "n_particles": len(particles),
        "particles_per_class": {
            t.name: sum(d["per_class"][t.name] for d in details.values()) for t in templates
        },
        "parameters": asdict(params) | {"slab_thickness_voxels": params.slab_voxels},
        "conventions": dict(CONVENTIONS),
    }


def _check_outputs(out_dir: Path, planned: list[Path], overwrite: bool) -> None:
    """Refuse existing outputs (unless ``overwrite``); warn of MRC files this run leaves beside
    them."""
    check_folder(out_dir, "OUT_DIR")
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        raise CryocapsError(f"{existing[0]} exists; pass --overwrite to replace it")
    stale = sorted(
        (set((out_dir / "tomograms").glob("*.mrc")) | set((out_dir / "labels").glob("*.mrc")))
        - set(planned)
    )
    if stale:
        log.warning(
            "%s holds %d MRC file(s) this run does not write, e.g. %s",
            out_dir,
            len(stale),
            stale[0],
        )


def _write_tomogram(
    out_dir: Path,
    result: SimulatedTomogram,
    voxel_size_angstrom: float,
    preview: bool,
    overwrite: bool,
) -> list[Path]:
    """``tomograms/<name>.mrc``, ``labels/<name>.mrc`` (uint8) and, with ``preview``, its PNG."""
    from cryocaps.io.volumes import write_volume

    name = result.name
    paths = [
        write_volume(
            out_dir / "tomograms" / f"{name}.mrc",
            result.tomogram,
            voxel_size_angstrom,
            overwrite=overwrite,
        ),
        write_volume(
            out_dir / "labels" / f"{name}.mrc",
            result.labels,
            voxel_size_angstrom,
            dtype="uint8",
            overwrite=overwrite,
        ),
    ]
    if preview:
        from cryocaps.plots import plot_simulation_preview

        paths.append(
            plot_simulation_preview(
                out_dir / f"preview_{name}.png", result.tomogram, result.labels, name, overwrite
            )
        )
    return paths


def _write_tables(
    out_dir: Path,
    particles: pd.DataFrame,
    table: ClassTable,
    templates: Sequence[ParticleTemplate],
    params: SimulationParameters,
    names: list[str],
    overwrite: bool,
) -> list[Path]:
    """The particle files, ``tomograms.star``, the class densities and ``classes.csv``."""
    from cryocaps.io.particles import write_particles, write_tomograms_star
    from cryocaps.io.volumes import TomogramInfo, write_volume

    infos = [TomogramInfo(name, params.shape, params.voxel_size_angstrom) for name in names]
    paths = [
        write_particles(
            particles,
            out_dir / file_name,
            format=format,
            tomograms=infos,
            classes=table,
            overwrite=overwrite,
        )
        for file_name, format in PARTICLE_FILES.items()
    ]
    paths.append(
        write_tomograms_star(
            out_dir / "tomograms.star",
            infos,
            tomogram_paths=[f"tomograms/{info.name}.mrc" for info in infos],
            voltage_kv=params.voltage_kv,
            cs_mm=params.cs_mm,
            amplitude_contrast=params.amplitude_contrast,
            overwrite=overwrite,
        )
    )
    paths += [
        write_volume(
            out_dir / "templates" / f"{t.name}.mrc",
            t.density,
            params.voxel_size_angstrom,
            overwrite=overwrite,
        )
        for t in templates
    ]
    paths.append(write_classes(table, out_dir / "classes.csv", overwrite=True))
    return paths
