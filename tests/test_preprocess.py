"""preprocess: Fourier rescaling, soft band-pass, inversion, normalisation, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cryocaps.io.volumes import read_tomogram, write_volume
from cryocaps.preprocess import (
    bandpass_filter,
    effective_voxel_sizes,
    fourier_rescale,
    preprocess_volume,
    rescaled_shape,
)


def _waves(shape, voxel, waves):
    """Sum of cosines: each wave is (axis, wavelength in Å, amplitude); positions are
    voxel * index."""
    grids = np.indices(shape, dtype=np.float64) * voxel
    volume = np.full(shape, 2.0)
    for axis, wavelength, amplitude in waves:
        volume += amplitude * np.cos(2 * np.pi * grids[axis] / wavelength + 0.3)
    return volume.astype(np.float32)


def test_binning_keeps_a_wave_below_the_new_nyquist_and_drops_one_above():
    shape, voxel = (24, 40, 48), 5.4
    kept = (2, 48 * voxel / 5, 1.0)  # 5 periods along x: 51.8 Å, new Nyquist 21.6 Å
    kept_y = (1, 40 * voxel / 3, 0.5)
    above = (0, 24 * voxel / 10, 0.7)  # 13 Å: above 2x-binned Nyquist, must not alias
    volume = _waves(shape, voxel, [kept, kept_y, above])
    binned = fourier_rescale(volume, voxel, 2 * voxel)
    assert binned.shape == (12, 20, 24)
    expected = _waves(binned.shape, 2 * voxel, [kept, kept_y])
    np.testing.assert_allclose(binned, expected, atol=1e-4)


def test_non_integer_ratio_keeps_wave_and_conserves_extent():
    shape, voxel, target = (32, 40, 64), 6.0, 8.0  # ratio 0.75: 32->24, 40->30, 64->48
    wave = (2, 64 * voxel / 4, 1.0)
    volume = _waves(shape, voxel, [wave])
    out = fourier_rescale(volume, voxel, target)
    assert out.shape == rescaled_shape(shape, voxel, target) == (24, 30, 48)
    assert np.allclose(np.array(out.shape) * target, np.array(shape) * voxel)
    np.testing.assert_allclose(out, _waves(out.shape, target, [wave]), atol=1e-4)


def test_odd_sizes_round_and_padding_makes_the_voxel_exact():
    shape, voxel, target = (33, 45, 51), 5.4, 10.0
    out = fourier_rescale(np.ones(shape, np.float32), voxel, target)
    assert out.shape == tuple(round(n * voxel / target) for n in shape)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)  # a constant stays constant, padding included
    # 45 voxels at 5.4 Å pad to 50 (27 output voxels of exactly 10 Å)
    assert effective_voxel_sizes((45,), voxel, target) == pytest.approx((10.0,))


def test_lowpass_and_highpass_separate_two_waves():
    shape, voxel = (16, 32, 64), 10.0
    coarse = (2, 64 * voxel / 2, 1.0)  # 320 Å
    fine = (1, 32 * voxel / 12, 1.0)  # 26.7 Å
    volume = _waves(shape, voxel, [coarse, fine])
    low = bandpass_filter(volume, voxel, lowpass_angstrom=60)
    np.testing.assert_allclose(low, _waves(shape, voxel, [coarse]), atol=1e-4)
    high = bandpass_filter(volume, voxel, highpass_angstrom=100)
    np.testing.assert_allclose(high, _waves(shape, voxel, [fine]) - 2.0, atol=1e-4)
    np.testing.assert_array_equal(volume, _waves(shape, voxel, [coarse, fine]))  # input untouched


def test_cosine_edge_is_soft():
    shape, voxel = (8, 8, 64), 10.0
    at_cutoff = (2, 64 * voxel / 16, 1.0)  # 40 Å wave, filtered exactly at 40 Å
    out = bandpass_filter(_waves(shape, voxel, [at_cutoff]), voxel, lowpass_angstrom=40)
    halved = (2, 64 * voxel / 16, 0.5)  # half way down the raised cosine
    np.testing.assert_allclose(out, _waves(shape, voxel, [halved]), atol=1e-4)


def test_preprocess_volume_inverts_and_normalises():
    rng = np.random.default_rng(0)
    volume = rng.normal(3.0, 2.0, (16, 20, 24)).astype(np.float32)
    plain, _ = preprocess_volume(volume, 4.0)
    inverted, voxel = preprocess_volume(volume, 4.0, invert=True)
    assert voxel == 4.0
    assert abs(plain.mean()) < 1e-5 and plain.std() == pytest.approx(1.0, abs=1e-4)
    assert np.corrcoef(plain.ravel(), inverted.ravel())[0, 1] < -0.999
    raw, _ = preprocess_volume(volume, 4.0, normalize_output=False)
    np.testing.assert_allclose(raw, volume)


def _tomogram(path, shape=(20, 24, 28), voxel=5.4, origin=(10.0, 20.0, 30.0), dtype="float32"):
    rng = np.random.default_rng(1)
    data = rng.normal(0, 5, shape)
    write_volume(path, data, voxel, origin_angstrom=origin, dtype=dtype)
    return path


def test_cli_bins_several_tomograms(tmp_path, run_cli):
    _tomogram(tmp_path / "in" / "TS_01.mrc")
    _tomogram(tmp_path / "in" / "TS_02.rec", shape=(21, 25, 27), dtype="int16")
    out = tmp_path / "out"
    result = run_cli(
        "preprocess",
        tmp_path / "in",
        "-o",
        out,
        "--voxel-size-angstrom",
        "10.8",
        "--lowpass-angstrom",
        "30",
    )
    assert result.exit_code == 0, result.output
    first = read_tomogram(out / "TS_01.mrc")
    assert first.shape == (10, 12, 14)
    assert first.voxel_size_angstrom == pytest.approx(10.8)
    assert first.origin_angstrom == pytest.approx((10.0, 20.0, 30.0))
    assert first.data.dtype == np.float32
    assert abs(first.data.mean()) < 1e-4 and first.data.std() == pytest.approx(1.0, abs=1e-3)
    second = read_tomogram(out / "TS_02.rec")
    assert second.shape == (11, 13, 14)  # halves rounded up: 10.5 -> 11, 12.5 -> 13, 13.5 -> 14
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "preprocess"
    assert [t["output_shape_zyx"] for t in run["results"]["tomograms"]] == [
        [10, 12, 14],
        [11, 13, 14],
    ]

    again = run_cli("preprocess", tmp_path / "in", "-o", out, "--voxel-size-angstrom", "10.8")
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (
        run_cli(
            "preprocess", tmp_path / "in", "-o", out, "--voxel-size-angstrom", "10.8", "--overwrite"
        ).exit_code
        == 0
    )


def test_cli_upsampling_needs_permission(tmp_path, run_cli):
    source = _tomogram(tmp_path / "TS_01.mrc", shape=(8, 10, 12))
    result = run_cli("preprocess", source, "-o", tmp_path / "out", "--voxel-size-angstrom", "2.7")
    assert result.exit_code == 2
    assert "--allow-upsample" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "TS_01.mrc").exists()
    result = run_cli(
        "preprocess",
        source,
        "-o",
        tmp_path / "out",
        "--voxel-size-angstrom",
        "2.7",
        "--allow-upsample",
        "--no-normalize",
    )
    assert result.exit_code == 0, result.output
    up = read_tomogram(tmp_path / "out" / "TS_01.mrc")
    assert up.shape == (16, 20, 24) and up.voxel_size_angstrom == pytest.approx(2.7)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--voxel-size-angstrom", "-3"], "--voxel-size-angstrom"),
        (["--lowpass-angstrom", "60", "--highpass-angstrom", "40"], "--highpass-angstrom"),
        (["--lowpass-angstrom", "0"], "--lowpass-angstrom"),
        (["--voxel-size-angstrom", "10", "--highpass-angstrom", "15"], "Nyquist"),
    ],
)
def test_cli_bad_options(tmp_path, run_cli, args, expected):
    source = _tomogram(tmp_path / "TS_01.mrc", shape=(8, 10, 12))
    result = run_cli("preprocess", source, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "TS_01.mrc").exists()


def test_cli_missing_file_and_same_folder(tmp_path, run_cli):
    result = run_cli("preprocess", tmp_path / "nope.mrc", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "nope.mrc" in result.output
    source = _tomogram(tmp_path / "TS_01.mrc", shape=(8, 10, 12))
    result = run_cli("preprocess", source, "-o", tmp_path, "--overwrite")
    assert result.exit_code == 2 and "replace the input" in result.output


@pytest.mark.parametrize("target", [10.8, 8.1])
def test_rescaling_keeps_physical_positions(target):
    """A smooth blob stays at the same place in Å: voxel 0 does not move (origin unchanged)."""
    voxel, shape = 5.4, (32, 40, 48)
    centre_angstrom = np.array([80.0, 101.0, 133.0])  # z, y, x
    grid = np.indices(shape, dtype=np.float64) * voxel
    blob = np.exp(
        -sum((grid[a] - centre_angstrom[a]) ** 2 for a in range(3)) / (2 * 12.0**2)
    ).astype(np.float32)
    out = fourier_rescale(blob, voxel, target).astype(np.float64)
    positions = np.indices(out.shape, dtype=np.float64) * target
    weights = np.clip(out, 0, None)
    centroid = np.array([(positions[a] * weights).sum() / weights.sum() for a in range(3)])
    np.testing.assert_allclose(centroid, centre_angstrom, atol=0.2)


def test_cli_header_without_voxel_size(tmp_path, run_cli):
    import mrcfile

    path = tmp_path / "TS_01.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=(8, 10, 12)).astype(np.float32))
        mrc.voxel_size = 0.0
    result = run_cli("preprocess", path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--input-voxel-size-angstrom" in result.output
    result = run_cli("preprocess", path, "-o", tmp_path / "out", "--input-voxel-size-angstrom", "5")
    assert result.exit_code == 0, result.output
    assert read_tomogram(tmp_path / "out" / "TS_01.mrc").voxel_size_angstrom == pytest.approx(5.0)
