"""Simulate tomograms with ground truth: particles, tilt series, CTF, noise, WBP.

Writes OUT_DIR/tomograms/tomo_NN.mrc, OUT_DIR/labels/tomo_NN.mrc (uint8 class
labels), OUT_DIR/particles.star (RELION 5, with tomograms.star),
OUT_DIR/particles.csv, OUT_DIR/particles_stopgap.star, OUT_DIR/classes.csv
(label, name, radius measured from the density, template), the class densities
OUT_DIR/templates/<class>.mrc and OUT_DIR/run.json. Particles are the built-in classes
(globule ~35 Å, barrel ~60 Å, dumbbell ~95 Å, ribosome-like ~125 Å radius; by
name also assemblies of point-like subunits: ring, stacked-rings, filament,
shell) or the density maps / atomic models in --structures DIR. Orientations are RELION
ZYZ angles (rot, tilt, psi): a particle is its class density rotated by
RELION's matrix A(rot, tilt, psi). SNR is the variance of the CTF-modulated
particle projections over the variance of the added noise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cryocaps.cli.common import (
    Overwrite,
    Quiet,
    Seed,
    command_line,
    console,
    in_range,
    positive,
    print_table,
    progress,
    setup_logging,
)
from cryocaps.simulate.parameters import SimulationParameters, parse_shape

DEFAULTS = SimulationParameters()  # the library's defaults (that module imports nothing heavy)
_DEFAULT_SHAPE = ",".join(map(str, DEFAULTS.shape))


def command(
    out_dir: Annotated[Path, typer.Argument(help="Output folder (created if missing).")],
    n_tomograms: Annotated[
        int,
        typer.Option(
            "--n-tomograms",
            callback=in_range(1),
            help=f"Number of tomograms. [default: {DEFAULTS.n_tomograms}]",
        ),
    ] = DEFAULTS.n_tomograms,
    shape: Annotated[
        str,
        typer.Option(
            "--shape",
            help=f"Tomogram size in voxels, Z,Y,X (Z along the beam). [default: {_DEFAULT_SHAPE}]",
        ),
    ] = _DEFAULT_SHAPE,
    voxel_size_angstrom: Annotated[
        float,
        typer.Option(
            "--voxel-size-angstrom",
            callback=positive,
            help="Voxel (and detector pixel) size in Å. "
            f"[default: {DEFAULTS.voxel_size_angstrom:g}]",
        ),
    ] = DEFAULTS.voxel_size_angstrom,
    structures: Annotated[
        Path | None,
        typer.Option(
            "--structures",
            help="Folder of density maps (.mrc/.map, any voxel size) "
            "and atomic models (.pdb/.cif, .gz ok); "
            "one class per name (1bxn_10A.mrc and 1bxn.pdb.gz are both class 1bxn). "
            "[default: built-in classes]",
        ),
    ] = None,
    classes_from: Annotated[
        str | None,
        typer.Option(
            "--classes-from",
            help="Comma-separated class names to use, e.g. 1bxn,3gl1,4v4r (or globule,ribosome; "
            "the assemblies ring, stacked-rings, filament, shell only by name). "
            "[default: all]",
        ),
    ] = None,
    prefer: Annotated[
        str,
        typer.Option(
            "--prefer",
            help="When a class has both: use its map (maps) or its atomic model (models). "
            "[default: maps]",
        ),
    ] = "maps",
    snr: Annotated[
        float,
        typer.Option(
            "--snr",
            callback=positive,
            help="Signal-to-noise ratio of the tilt images: variance of the CTF-modulated "
            f"particle projections / noise variance. [default: {DEFAULTS.snr:g}]",
        ),
    ] = DEFAULTS.snr,
    tilt_range_deg: Annotated[
        float,
        typer.Option(
            "--tilt-range-deg",
            callback=in_range(0, 90, low_open=True),
            help="Tilts from -T to +T degrees, tilt axis Y; in (0, 90]. "
            f"[default: {DEFAULTS.tilt_range_deg:g}]",
        ),
    ] = DEFAULTS.tilt_range_deg,
    tilt_step_deg: Annotated[
        float,
        typer.Option(
            "--tilt-step-deg",
            callback=positive,
            help=f"Tilt increment in degrees. [default: {DEFAULTS.tilt_step_deg:g}]",
        ),
    ] = DEFAULTS.tilt_step_deg,
    defocus_um: Annotated[
        float,
        typer.Option(
            "--defocus-um",
            callback=positive,
            help=f"Underfocus in µm (positive). [default: {DEFAULTS.defocus_um:g}]",
        ),
    ] = DEFAULTS.defocus_um,
    voltage_kv: Annotated[
        float,
        typer.Option(
            "--voltage-kv",
            callback=positive,
            help=f"Acceleration voltage in kV. [default: {DEFAULTS.voltage_kv:g}]",
        ),
    ] = DEFAULTS.voltage_kv,
    cs_mm: Annotated[
        float,
        typer.Option(
            "--cs-mm",
            callback=in_range(0),
            help=f"Spherical aberration in mm. [default: {DEFAULTS.cs_mm:g}]",
        ),
    ] = DEFAULTS.cs_mm,
    amplitude_contrast: Annotated[
        float,
        typer.Option(
            "--amplitude-contrast",
            callback=in_range(0, 1),
            help=f"Amplitude contrast fraction. [default: {DEFAULTS.amplitude_contrast:g}]",
        ),
    ] = DEFAULTS.amplitude_contrast,
    blur_angstrom: Annotated[
        float,
        typer.Option(
            "--blur-angstrom",
            help="Gaussian blur of the tilt images, standard deviation in Å (drift, beam "
            "damage, alignment errors; an envelope on the CTF); 0 = none. "
            f"[default: {DEFAULTS.blur_angstrom:g}]",
        ),
    ] = DEFAULTS.blur_angstrom,
    n_particles: Annotated[
        int | None,
        typer.Option(
            "--n-particles",
            callback=in_range(0),
            help="Particles per tomogram, split evenly over the classes. "
            "[default: from --crowding]",
        ),
    ] = DEFAULTS.n_particles,
    crowding: Annotated[
        float,
        typer.Option(
            "--crowding",
            callback=in_range(0, 0.4),
            help="Fraction of the slab volume filled by particle envelope spheres, 0-0.4. "
            f"[default: {DEFAULTS.crowding:g}]",
        ),
    ] = DEFAULTS.crowding,
    slab_thickness_angstrom: Annotated[
        float | None,
        typer.Option(
            "--slab-thickness-angstrom",
            callback=positive,
            help="Sample (ice) thickness in Å; particles stay inside it. "
            "[default: 80% of the box height]",
        ),
    ] = DEFAULTS.slab_thickness_angstrom,
    label_shape: Annotated[
        str,
        typer.Option(
            "--label-shape",
            help="Label maps as spheres of each class radius (sphere) or the particle "
            f"envelopes (template). [default: {DEFAULTS.label_shape}]",
        ),
    ] = DEFAULTS.label_shape,
    distractors: Annotated[
        bool,
        typer.Option(
            "--distractors/--no-distractors",
            help="Add gold beads on the slab surfaces and, in about half "
            "of the tomograms, a membrane sheet (both labelled background). [default: on]",
        ),
    ] = DEFAULTS.distractors,
    preview: Annotated[
        bool,
        typer.Option(
            "--preview", help="Also write OUT_DIR/preview_<tomo>.png (central XY and XZ slices)."
        ),
    ] = False,
    seed: Seed = DEFAULTS.seed,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    setup_logging(quiet=quiet)
    from cryocaps.runinfo import write_run_json
    from cryocaps.simulate import check_parameters, load_templates, simulate_dataset

    started = time.time()
    params = SimulationParameters(
        n_tomograms=n_tomograms,
        shape=parse_shape(shape),
        voxel_size_angstrom=voxel_size_angstrom,
        snr=snr,
        tilt_range_deg=tilt_range_deg,
        tilt_step_deg=tilt_step_deg,
        defocus_um=defocus_um,
        voltage_kv=voltage_kv,
        cs_mm=cs_mm,
        amplitude_contrast=amplitude_contrast,
        blur_angstrom=blur_angstrom,
        n_particles=n_particles,
        crowding=crowding,
        slab_thickness_angstrom=slab_thickness_angstrom,
        label_shape=label_shape,
        distractors=distractors,
        seed=seed,
    )
    check_parameters(params)  # before the structures are read: bad numbers fail fast
    names = [n.strip() for n in classes_from.split(",") if n.strip()] if classes_from else None
    templates = load_templates(voxel_size_angstrom, structures, names, prefer)
    with progress("Simulating", total=n_tomograms) as advance:
        summary = simulate_dataset(
            out_dir,
            templates,
            params,
            overwrite=overwrite,
            preview=preview,
            progress=lambda info: advance(info=info),
        )
    write_run_json(
        out_dir,
        command=command_line(),
        inputs=[structures] if structures else [],
        outputs=summary["outputs"],
        parameters=summary["parameters"]
        | {"structures": structures, "classes_from": names, "prefer": prefer},
        seed=seed,
        timings={"total": time.time() - started},
        results={
            k: summary[k]
            for k in ("classes", "class_sources", "tomograms", "n_particles", "conventions")
        },
    )
    if not quiet:
        rows = [
            [c["label"], c["name"], c["radius_angstrom"], summary["particles_per_class"][c["name"]]]
            for c in summary["classes"]
        ]
        print_table(
            f"{n_tomograms} tomogram(s) in {out_dir}",
            ["label", "class", "radius Å", "particles"],
            rows,
        )
        console.print(f"Done in {time.time() - started:.1f} s")
