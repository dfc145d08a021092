"""MRC reading and writing."""

from __future__ import annotations

import numpy as np
import pytest

from cryocaps.errors import CryocapsError
from cryocaps.io.volumes import MrcVolumeWriter, read_info, read_tomogram, write_volume


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8"])
def test_write_read_round_trip(tmp_path, dtype):
    data = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 100).astype(dtype)
    path = write_volume(tmp_path / "v.mrc", data, 7.5, origin_angstrom=(1.0, 2.0, 3.0), dtype=dtype)
    tomo = read_tomogram(path)
    assert tomo.shape == (4, 5, 6)
    assert tomo.voxel_size_angstrom == pytest.approx(7.5)
    assert tomo.origin_angstrom == pytest.approx((1.0, 2.0, 3.0))
    np.testing.assert_array_equal(tomo.data.astype(np.float64), data.astype(np.float64))
    assert tomo.name == "v"
    info = read_info(path)
    assert info.shape == (4, 5, 6) and info.voxel_size_angstrom == pytest.approx(7.5)


def test_refuses_overwrite(tmp_path):
    data = np.zeros((3, 3, 3), np.float32)
    write_volume(tmp_path / "v.mrc", data, 1.0)
    with pytest.raises(CryocapsError, match="--overwrite"):
        write_volume(tmp_path / "v.mrc", data, 1.0)
    write_volume(tmp_path / "v.mrc", data + 1, 1.0, overwrite=True)
    assert read_tomogram(tmp_path / "v.mrc").data.max() == 1


def test_failed_write_leaves_no_file(tmp_path):
    class Boom(np.ndarray):
        pass

    with pytest.raises(CryocapsError):
        write_volume(tmp_path / "v.mrc", np.zeros((3, 3, 3)), 0.0)
    with (
        pytest.raises(ZeroDivisionError),
        MrcVolumeWriter(tmp_path / "w.mrc", (2, 3, 3), 1.0) as writer,
    ):
        writer.data[0] = 1
        raise ZeroDivisionError
    assert list(tmp_path.iterdir()) == []


def test_streaming_writer(tmp_path):
    with MrcVolumeWriter(tmp_path / "w.mrc", (4, 3, 3), 2.0, dtype="uint8") as writer:
        for z in range(4):
            writer.data[z] = z
    tomo = read_tomogram(tmp_path / "w.mrc")
    assert tomo.data[:, 0, 0].tolist() == [0, 1, 2, 3]
    assert tomo.voxel_size_angstrom == pytest.approx(2.0)


def test_stack_writer_4d(tmp_path):
    with MrcVolumeWriter(tmp_path / "p.mrc", (2, 4, 3, 3), 2.0, dtype="float16") as writer:
        writer.data[1] = 0.5
    tomo = read_tomogram(tmp_path / "p.mrc", allow_stack=True)
    assert tomo.data.shape == (2, 4, 3, 3)
    assert tomo.data[1].min() == pytest.approx(0.5)
    assert read_info(tmp_path / "p.mrc").shape == (4, 3, 3)
    with pytest.raises(CryocapsError, match="3D"):
        read_tomogram(tmp_path / "p.mrc")


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CryocapsError, match="no such file"):
        read_tomogram(tmp_path / "absent.mrc")
    (tmp_path / "text.mrc").write_text("hello, not an MRC file\n" * 10)
    with pytest.raises(CryocapsError, match="text.mrc"):
        read_tomogram(tmp_path / "text.mrc")
    path = write_volume(tmp_path / "full.mrc", np.ones((8, 8, 8), np.float32), 1.0)
    raw = path.read_bytes()
    (tmp_path / "cut.mrc").write_bytes(raw[: len(raw) - 500])
    with pytest.raises(CryocapsError, match="cut.mrc"):
        read_tomogram(tmp_path / "cut.mrc")


def test_2d_and_nan_refused(tmp_path):
    write_volume(tmp_path / "flat.mrc", np.ones((1, 8, 8), np.float32), 1.0)
    with pytest.raises(CryocapsError, match="3D"):
        read_tomogram(tmp_path / "flat.mrc")
    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    write_volume(tmp_path / "nan.mrc", data, 1.0)
    with pytest.raises(CryocapsError, match="NaN"):
        read_tomogram(tmp_path / "nan.mrc")


def test_voxel_size_zero_needs_override(real_files):
    path = real_files / "mrc" / "cryocat_sphere_voxelsize0.mrc"
    with pytest.raises(CryocapsError, match="--voxel-size-angstrom"):
        read_tomogram(path)
    assert read_tomogram(path, voxel_size_angstrom=10.0).voxel_size_angstrom == 10.0


@pytest.mark.parametrize(
    "name", ["mrcfile_EMD-3001.map", "mrcfile_EMD-3197.map", "czportal_unsigned_ints_mode0.mrc"]
)
def test_real_mrc_files(real_files, name):
    tomo = read_tomogram(real_files / "mrc" / name)
    assert tomo.data.ndim == 3 and tomo.voxel_size_angstrom > 0
    mapped = read_tomogram(real_files / "mrc" / name, mmap=True)
    np.testing.assert_array_equal(np.asarray(mapped.data), tomo.data)
    mapped.close()


def test_real_2d_float16_file_is_refused_clearly(real_files):
    # RELION's mode-12 example is a single 64x64 image, not a tomogram.
    with pytest.raises(CryocapsError, match="expected a 3D volume"):
        read_tomogram(real_files / "mrc" / "relion_float16_mode12.mrc")
