"""Built-in assemblies of point-like subunits, low-contrast copies, and blurred imaging."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryocaps.assemblies import (
    ASSEMBLY_SHAPES,
    filament_segment,
    hollow_shell,
    named_templates,
    stacked_rings,
    subunit_ring,
)
from cryocaps.errors import CryocapsError
from cryocaps.simulate import SimulationParameters, ctf_2d
from cryocaps.structures import (
    BUILTIN_SHAPES,
    builtin_template,
    builtin_templates,
    shapes_template,
    with_contrast,
)

VOXEL = 4.0  # fine enough that 12 Å subunits stand apart at the envelope contour


def _distances_from_centre(cube: np.ndarray) -> np.ndarray:
    centre = (np.array(cube.shape) - 1) / 2
    grid = np.indices(cube.shape) - centre.reshape(3, 1, 1, 1)
    return np.sqrt((grid**2).sum(axis=0)) * VOXEL


def _envelope(template) -> np.ndarray:
    return template.density >= template.envelope_level


def test_ring_is_n_subunits_around_an_empty_centre():
    ring = shapes_template("ring", subunit_ring(8, 40.0, 8.0), VOXEL)
    inside = _envelope(ring)
    assert ndimage.label(inside)[1] == 8
    distance = _distances_from_centre(ring.density)
    assert ring.density[distance < 40.0 - 8.0 - VOXEL].max() < 0.05 * ring.density.max()
    assert ring.radius_angstrom == pytest.approx(48.0, abs=VOXEL)
    z_extent = np.flatnonzero(inside.any(axis=(1, 2)))  # the ring lies flat: z is thin
    assert (z_extent[-1] - z_extent[0] + 1) * VOXEL <= 2 * 8.0 + VOXEL


def test_stacked_rings_are_layers_around_an_open_channel():
    barrel = shapes_template("barrel", stacked_rings(3, 8, 40.0, 8.0, 24.0), VOXEL)
    density = barrel.density
    centre = (density.shape[0] - 1) // 2
    assert density[:, centre, centre].max() < 0.05 * density.max()  # open along the axis
    profile = density.sum(axis=(1, 2))  # along z: one peak per ring
    peaks = [k for k in range(1, len(profile) - 1) if profile[k] >= profile[k - 1] and
             profile[k] > profile[k + 1] and profile[k] > 0.5 * profile.max()]  # fmt: skip
    assert len(peaks) == 3
    assert np.diff(peaks) * VOXEL == pytest.approx([24.0, 24.0], abs=VOXEL)
    assert ndimage.label(_envelope(barrel))[1] == 24


def test_filament_is_long_along_its_axis_and_thin_across():
    filament = shapes_template("filament", filament_segment(10, 15.0, 20.0, 160.0, 8.0), VOXEL)
    inside = _envelope(filament)
    extent = [np.ptp(np.flatnonzero(inside.any(axis=a))) + 1 for a in ((1, 2), (0, 2), (0, 1))]
    length = 9 * 20.0 + 2 * 8.0
    assert extent[0] * VOXEL == pytest.approx(length, abs=2 * VOXEL)
    assert max(extent[1:]) * VOXEL <= 2 * (15.0 + 8.0) + 2 * VOXEL
    assert filament.radius_angstrom == pytest.approx(length / 2, abs=2 * VOXEL)


def test_hollow_shell_has_its_subunits_at_one_radius_and_nothing_inside():
    shell = shapes_template("shell", hollow_shell(30, 40.0, 7.0), VOXEL)
    distance = _distances_from_centre(shell.density)
    inside = _envelope(shell)
    assert distance[inside].min() >= 40.0 - 7.0 - VOXEL
    assert distance[inside].max() <= 40.0 + 7.0 + VOXEL
    assert shell.density[distance < 40.0 - 7.0 - VOXEL].max() < 0.05 * shell.density.max()
    assert ndimage.label(inside)[1] == 30


def test_named_assemblies_render_but_are_not_default_classes():
    assert set(ASSEMBLY_SHAPES).isdisjoint(BUILTIN_SHAPES)
    assert [t.name for t in named_templates(20.0)] == list(BUILTIN_SHAPES)
    templates = named_templates(10.0, ["shell", "globule"])
    assert [t.name for t in templates] == ["shell", "globule"]
    np.testing.assert_array_equal(templates[1].density, builtin_template("globule", 10.0).density)
    for name in ASSEMBLY_SHAPES:
        assert named_templates(10.0, [name])[0].radius_angstrom > 40.0
    with pytest.raises(CryocapsError, match="stacked-rings"):  # the message lists them
        named_templates(10.0, ["no-such-shape"])
    with pytest.raises(CryocapsError, match="ring"):  # not a default built-in class
        builtin_templates(10.0, ["ring"])


def test_low_contrast_copy_scales_the_density_only():
    (ring,) = named_templates(10.0, ["ring"])
    faint = with_contrast(ring, 0.5, "ring-faint")
    assert faint.name == "ring-faint" and ring.name == "ring"
    np.testing.assert_allclose(faint.density, 0.5 * ring.density, rtol=1e-6)
    assert faint.radius_angstrom == ring.radius_angstrom
    assert (_envelope(faint) == _envelope(ring)).all()
    with pytest.raises(CryocapsError, match="contrast"):
        with_contrast(ring, 0.0, "gone")


def test_blur_is_a_gaussian_envelope_on_the_ctf():
    sharp = SimulationParameters(voxel_size_angstrom=10.0)
    blurred = SimulationParameters(voxel_size_angstrom=10.0, blur_angstrom=8.0)
    ratio = ctf_2d((64, 64), 10.0, blurred) / ctf_2d((64, 64), 10.0, sharp)
    k = np.fft.rfftfreq(64, d=10.0)
    np.testing.assert_allclose(ratio[0, 1:], np.exp(-2 * np.pi**2 * 64.0 * k[1:] ** 2), rtol=1e-4)
    assert ratio[0, 0] == pytest.approx(1.0)
