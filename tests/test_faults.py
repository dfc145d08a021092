"""Faults survived: processes killed outright (SIGKILL) and writes that fail half-way (disk full).

A killed process runs no cleanup, so what survives is what was on disk: every output
is written under a temporary name and renamed when complete, segment skips the
tomograms whose outputs exist, and train resumes from its last checkpoint. The
processes are killed at a known point: a small driver (below) patches the library
to announce that point in a marker file and wait there, and the test sends SIGKILL.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryocaps.io.volumes import write_volume

REPO = Path(__file__).resolve().parents[1]
VOXEL = 10.0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock are POSIX")

# Runs the cryocaps CLI with one library function wrapped: the wrapper calls the original,
# then, the first time WHEN(*args) holds, writes its marker file and waits to be killed.
DRIVER = textwrap.dedent(
    """
    import importlib, os, signal, sys
    from pathlib import Path

    module = importlib.import_module(os.environ["FAULT_MODULE"])
    owner_name, _, function_name = os.environ["FAULT_FUNCTION"].rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    original = getattr(owner, function_name)
    when = eval(os.environ["FAULT_WHEN"])
    marker = Path(os.environ["FAULT_MARKER"])

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        if not marker.exists() and when(*args):
            marker.write_text(str(os.getpid()))
            while True:
                signal.pause()  # until the test's SIGKILL
        return result

    setattr(owner, function_name, wrapped)
    from cryocaps.cli.main import main

    sys.argv = ["cryocaps", *sys.argv[1:]]
    main()
    """
)


def _run_until_killed(args, tmp_path: Path, module: str, function: str, when: str) -> None:
    """Run ``cryocaps ARGS``; SIGKILL it once ``module.function`` returned with ``when`` true."""
    marker = tmp_path / "reached"
    marker.unlink(missing_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        FAULT_MODULE=module,
        FAULT_FUNCTION=function,
        FAULT_WHEN=when,
        FAULT_MARKER=str(marker),
    )
    command = [sys.executable, "-c", DRIVER, *map(str, args)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():  # the marker is written just before the driver waits
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace")
                pytest.fail(f"exited {process.returncode} before the fault point:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail("the fault point was never reached")
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def _parts(folder: Path) -> list[str]:
    """Temporary files left in ``folder`` (atomic writes name them .<name>.<random>.part)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# --------------------------------------------------------------------------- segment --shard


def _tiny_model_and_tomograms(folder: Path, n_tomograms: int = 4) -> tuple[Path, list[Path]]:
    import torch

    from cryocaps.modelfile import save_model
    from cryocaps.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", 3, widths=(4, 4, 4))
    classes = [{"label": n, "name": f"class{n}", "radius_angstrom": 30.0} for n in (1, 2)]
    metadata = {
        "classes": classes,
        "voxel_size_angstrom": VOXEL,
        "patch_size": 16,
        "normalization": {"method": "percentile_zscore", "clip_percentiles": [0.5, 99.5]},
    }
    model_dir = save_model(folder / "model", model, metadata)
    rng = np.random.default_rng(0)
    tomograms = []
    for t in range(n_tomograms):
        path = folder / "tomograms" / f"tomo_{t}.mrc"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_volume(path, rng.normal(size=(24, 32, 32)).astype(np.float32), VOXEL)
        tomograms.append(path)
    return model_dir, tomograms


def _maps(folder: Path) -> dict[str, tuple]:
    """Every MRC map in ``folder``: its data, voxel size and origin (not mrcfile's dated label)."""
    maps = {}
    for path in sorted(folder.glob("*.mrc")):
        with mrcfile.open(path, permissive=True) as mrc:
            maps[path.name] = (
                np.array(mrc.data),
                mrc.voxel_size.tolist(),
                mrc.header.origin.tolist(),
                int(mrc.header.mode),
            )
    return maps


def test_segment_shard_killed_mid_tomogram_and_resubmitted_matches_an_uninterrupted_run(
    tmp_path, run_cli
):
    model_dir, tomograms = _tiny_model_and_tomograms(tmp_path)
    # several windows per tomogram, so "mid-tomogram" is mid-write; one thread for equal floats
    options = ["--model", model_dir, "--patch-size", "16", "--overlap", "4", "--threads", "1",
               "--probabilities"]  # fmt: skip
    reference = tmp_path / "reference"
    assert run_cli("segment", *tomograms, *options, "-o", reference).exit_code == 0

    out = tmp_path / "sharded"
    shard_0 = ["segment", *tomograms, *options, "-o", out, "--shard", "0/2"]
    # shard 0 of 2 holds tomo_0 and tomo_2: killed after the first slab of tomo_2's maps
    _run_until_killed(
        shard_0,
        tmp_path,
        "cryocaps.inference.sinks",
        "MrcMapsSink.aggregate",
        "lambda sink, region, block: sink.paths['labels'].name == 'tomo_2_labels.mrc'",
    )
    assert (out / "tomo_0_labels.mrc").is_file() and (out / "tomo_0_probs.mrc").is_file()
    assert not (out / "tomo_2_labels.mrc").exists() and not (out / "tomo_2_probs.mrc").exists()
    left = _parts(out)
    assert any(name.startswith(".tomo_2_labels.mrc.") for name in left), left  # killed mid-write

    assert run_cli("segment", *tomograms, *options, "-o", out, "--shard", "1/2").exit_code == 0
    resubmitted = run_cli(*shard_0)
    assert resubmitted.exit_code == 0, resubmitted.output
    record = json.loads((out / "run_shard-0-of-2.json").read_text())["results"]
    assert [Path(p).name for p in record["skipped"]] == ["tomo_0.mrc"]  # not segmented twice
    assert [Path(r["tomogram"]).name for r in record["tomograms"]] == ["tomo_2.mrc"]
    assert _parts(out) == []  # the killed run's temporary files were removed

    expected, got = _maps(reference), _maps(out)
    assert sorted(got) == sorted(expected) and len(expected) == 8  # labels + probabilities x 4
    for name, (data, *header) in expected.items():
        np.testing.assert_array_equal(got[name][0], data, err_msg=name)
        assert got[name][1:] == tuple(header), name


# --------------------------------------------------------------------------- train --resume


def _training_data(folder: Path) -> Path:
    """Two tomograms of dark spheres (classes of radius 3 and 5 voxels) with their label maps."""
    rng = np.random.default_rng(0)
    shape = (24, 40, 40)
    zz, yy, xx = np.indices(shape)
    (folder / "tomograms").mkdir(parents=True)
    (folder / "labels").mkdir()
    for t in range(2):
        volume = rng.normal(0, 0.5, shape).astype(np.float32)
        label_map = np.zeros(shape, np.uint8)
        for k, (z, y, x) in enumerate([(7, 8, 8), (16, 20, 32), (7, 32, 20), (16, 8, 20)]):
            label, radius = (1, 3) if k % 2 == 0 else (2, 5)
            inside = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
            volume[inside] -= 2.0
            label_map[inside] = label
        write_volume(folder / "tomograms" / f"tomo_{t}.mrc", volume, VOXEL)
        write_volume(folder / "labels" / f"tomo_{t}_labels.mrc", label_map, VOXEL, dtype="uint8")
    (folder / "classes.csv").write_text("label,name,radius_angstrom\n1,small,30\n2,large,50\n")
    return folder


STEPS_PER_EPOCH = 3


def test_train_killed_between_checkpoints_resumes_from_the_last_one(tmp_path, run_cli):
    data = _training_data(tmp_path / "data")
    args = ["train", "-t", data / "tomograms", "-l", data / "labels", "--model", "unet",
            "--model-option", "widths=4,4,4", "--patch-size", "16", "--epochs", "3",
            "--steps-per-epoch", STEPS_PER_EPOCH, "--max-val-patches", "4", "--patience", "0",
            "--seed", "3", "--threads", "1"]  # fmt: skip
    full = tmp_path / "full"
    assert run_cli(*args, "-o", full).exit_code == 0

    run = tmp_path / "killed"
    # killed after step 5 of 9: the checkpoint of epoch 1 (step 3) is the last one on disk
    _run_until_killed(
        [*args, "-o", run],
        tmp_path,
        "cryocaps.training.loop",
        "Trainer._step",
        f"lambda trainer: trainer.state.total_steps == {STEPS_PER_EPOCH + 2}",
    )
    from cryocaps.training.checkpoint import load_checkpoint

    saved = load_checkpoint(run / "checkpoint_last.pt")["state"]
    assert (saved["epoch"], saved["step_in_epoch"], saved["total_steps"]) == (1, 0, 3)
    assert len(pd.read_csv(run / "metrics.csv")) == 1

    resumed = run_cli(*args, "-o", run, "--resume")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((run / "run.json").read_text())["results"]
    # what was lost: the two steps after the checkpoint, less than one checkpoint interval
    assert summary["steps_done"] == 3 * STEPS_PER_EPOCH
    assert summary["steps_this_run"] == 2 * STEPS_PER_EPOCH
    assert _parts(run) == []
    # the resumed run continued exactly: the same epochs as the run never killed
    expected, got = pd.read_csv(full / "metrics.csv"), pd.read_csv(run / "metrics.csv")
    assert got["epoch"].tolist() == [1, 2, 3]
    columns = [
        c
        for c in expected.columns
        if (c == "train_loss" or c.startswith(("val_", "dice_"))) and not c.endswith("_seconds")
    ]
    np.testing.assert_allclose(got[columns].to_numpy(), expected[columns].to_numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- disk full


class _FillingFile:
    """A file whose writes fail with ENOSPC once ``budget[0]`` bytes (or characters) are written.

    The part of the failing write that fits is written first, as a full disk does.
    """

    def __init__(self, handle, budget: list[int]):
        self._handle = handle
        self._budget = budget

    def write(self, data):
        text = isinstance(data, str)
        size = len(data) if text else memoryview(data).nbytes
        if size > self._budget[0]:
            fitting = data[: self._budget[0]] if text else memoryview(data).tobytes()
            self._handle.write(fitting[: self._budget[0]])
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= size
        return self._handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


@pytest.fixture
def disk_full(monkeypatch, tmp_path):
    """``disk_full(n)``: from now on, files opened for writing under tmp_path hold n bytes."""
    import builtins

    real_open = io.open

    def limit(n_bytes: int) -> None:
        budget = [n_bytes]

        def filling_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            writing = any(flag in mode for flag in "wax+")
            inside = isinstance(file, str | os.PathLike) and Path(file).is_relative_to(tmp_path)
            return _FillingFile(handle, budget) if writing and inside else handle

        monkeypatch.setattr(builtins, "open", filling_open)
        monkeypatch.setattr(io, "open", filling_open)

    return limit


def _assert_disk_full(write, folder: Path, final: Path, before: bytes | None) -> None:
    """``write()`` fails with ENOSPC and leaves ``final`` as it was, with no temporary file."""
    with pytest.raises(OSError) as failure:
        write()
    assert failure.value.errno == errno.ENOSPC
    if before is None:
        assert not final.exists()
    else:
        assert final.read_bytes() == before
    assert _parts(folder) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_mrc_write_failing_half_way_leaves_no_file_under_the_final_name(
    tmp_path, disk_full, existing
):
    folder = tmp_path / "out"
    final = folder / "tomo.mrc"
    volume = np.random.default_rng(0).normal(size=(16, 32, 32)).astype(np.float32)  # 64 KiB
    before = None
    if existing:
        write_volume(final, volume[:4], VOXEL)
        before = final.read_bytes()
    disk_full(1024 + volume.nbytes // 2)  # the header and half of the data fit
    _assert_disk_full(
        lambda: write_volume(final, volume, VOXEL, overwrite=True), folder, final, before
    )


def test_mrc_slab_writer_failing_at_its_header_leaves_no_file(tmp_path, disk_full):
    from cryocaps.io.volumes import volume_writer

    folder = tmp_path / "segmentation"
    final = folder / "tomo_labels.mrc"

    def write_maps():
        # creating writes the header and sizes the memory map: 1025 bytes; the header's
        # statistics written on closing (1024 bytes more) do not fit
        disk_full(1100)
        with volume_writer(final, (8, 16, 16), VOXEL, dtype="uint8") as writer:
            writer.data[:] = 1

    _assert_disk_full(write_maps, folder, final, None)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_star_write_failing_half_way_leaves_no_file_under_the_final_name(
    tmp_path, disk_full, sphere_volume, existing
):
    from cryocaps.io.particles import write_particles

    table = sphere_volume[1].assign(class_name=["1", "2", "1"])  # RELION 3 numbers classes
    folder = tmp_path / "picks"
    final = folder / "picks.star"
    before = None
    if existing:
        write_particles(table.iloc[:1], final, format="relion3")
        before = final.read_bytes()
    disk_full(200)  # the header block fits, the rows do not
    _assert_disk_full(
        lambda: write_particles(table, final, format="relion3", overwrite=True),
        folder,
        final,
        before,
    )


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_json_write_failing_half_way_leaves_no_file_under_the_final_name(
    tmp_path, disk_full, existing
):
    from cryocaps.runinfo import write_run_json

    folder = tmp_path / "run"
    final = folder / "run.json"
    before = None
    if existing:
        write_run_json(folder, command=["cryocaps", "segment"], started=time.time())
        before = final.read_bytes()
    disk_full(100)
    _assert_disk_full(
        lambda: write_run_json(folder, command=["cryocaps", "segment", "x"], started=time.time()),
        folder,
        final,
        before,
    )


def test_stale_parts_of_killed_writers_are_removed_and_living_ones_kept(tmp_path):
    from cryocaps.io.files import atomic_path, remove_stale_parts

    final = tmp_path / "picks.star"
    stale = tmp_path / ".picks.star.abc123.part"  # as a SIGKILLed writer leaves it
    stale.write_text("half")
    other = tmp_path / ".other.star.def456.part"  # another output's: not ours to judge
    other.write_text("half")
    with atomic_path(final) as tmp:
        assert not stale.exists() and other.exists()
        tmp.write_text("data_\n")
        assert remove_stale_parts(final) == []  # the living writer's part is locked, kept
        assert tmp.exists()
    assert final.read_text() == "data_\n"
    assert _parts(tmp_path) == [other.name]
