"""Sliding-window segmentation: blending, geometry, bounded-memory streaming, files, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cryocaps.errors import CryocapsError  # noqa: E402
from cryocaps.inference import (  # noqa: E402
    TTA_FLIPS,
    ArraySink,
    BlendSink,
    ProbabilityPredictor,
    axis_weights,
    plan_axis,
    plan_windows,
    reflect_indices,
    resolve_window,
    segment_tomogram,
    select_shard,
    sliding_window,
)
from cryocaps.io.volumes import read_tomogram, write_volume  # noqa: E402

CLASSES = [
    {"label": 1, "name": "ribosome", "radius_angstrom": 60.0},
    {"label": 2, "name": "proteasome", "radius_angstrom": 40.0},
]
NORMALIZATION = {"method": "percentile_zscore", "clip_percentiles": [0.5, 99.5]}


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared: one thread avoids OpenMP threads waiting on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pointwise(x):
    """A model whose output at a voxel depends only on that voxel: any misplaced window shows."""
    return torch.cat([x, 2 * x + 1, x * x], dim=1)


def random_conv_model(seed=0):
    """A context-dependent model (two 3x3x3 convolutions, zero padding): window borders matter."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 2, 3, padding=1)
    ).eval()
    return model


def reference_blend(volume, predictor, patch, overlap, size_multiple=1, blending="gaussian"):
    """All-in-memory blending: pad the whole volume, accumulate every window, no streaming."""
    plans = plan_windows(volume.shape, patch, overlap, size_multiple)
    padded = volume[
        np.ix_(
            *(
                reflect_indices(p.lattice_start, p.lattice_start + p.lattice_length, p.size)
                for p in plans
            )
        )
    ]
    weights = [axis_weights(p, blending) for p in plans]
    total = None
    for k, j, i in itertools.product(*(range(p.n_windows) for p in plans)):
        corner = [p.starts[n] - p.lattice_start for p, n in zip(plans, (k, j, i), strict=True)]
        window = padded[tuple(slice(c, c + p.patch) for c, p in zip(corner, plans, strict=True))]
        with torch.inference_mode():
            values = predictor(torch.from_numpy(np.ascontiguousarray(window))[None, None])[
                0
            ].numpy()
        weight = weights[0][k][:, None, None] * weights[1][j][:, None] * weights[2][i]
        if total is None:
            total = np.zeros((values.shape[0], *padded.shape), np.float64)
        total[
            (slice(None), *(slice(c, c + p.patch) for c, p in zip(corner, plans, strict=True)))
        ] += weight * values
    crop = tuple(slice(-p.lattice_start, -p.lattice_start + p.size) for p in plans)
    return total[(slice(None), *crop)]


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [2, 7, 31, 32, 33, 100, 161])
@pytest.mark.parametrize(
    "patch,overlap,multiple", [(16, 4, 4), (32, 25, 8), (24, 0, 4), (12, 6, 1)]
)
def test_plan_covers_the_volume_with_margins(size, patch, overlap, multiple):
    plan = plan_axis(size, patch, overlap, multiple)
    margin = -(-overlap // 2)
    assert plan.patch % multiple == 0 and plan.patch <= patch
    assert plan.starts[0] <= -margin
    assert plan.starts[-1] + plan.patch >= size + margin
    assert all(b - a == plan.patch - overlap for a, b in itertools.pairwise(plan.starts))
    weights = axis_weights(plan, "gaussian")
    coverage = np.zeros(plan.lattice_length)
    for n, start in enumerate(plan.starts):
        coverage[start - plan.lattice_start : start - plan.lattice_start + plan.patch] += weights[n]
    np.testing.assert_allclose(coverage, 1.0, rtol=1e-6)


def test_patch_larger_than_volume_gives_one_fitted_window():
    plan = plan_axis(10, 64, 8, 4)
    assert plan.n_windows == 1
    assert plan.patch == 20  # 10 + 2 x 4 margin = 18, rounded up to a multiple of 4
    assert plan.starts == (-5,)  # centred


@pytest.mark.parametrize(
    "patch,overlap,message",
    [
        (16, 16, "--overlap 16"),
        (16, -1, "--overlap -1"),
        (18, 4, "--patch-size 18"),
        ((16, 16), 4, "--patch-size"),
    ],
)
def test_bad_window_settings_are_refused(patch, overlap, message):
    with pytest.raises(CryocapsError, match=message):
        sliding_window(
            np.zeros((20, 20, 20), np.float32), pointwise, patch, overlap, size_multiple=4
        )


@pytest.mark.parametrize(
    "patch,overlap,message",
    [
        (18, None, "--patch-size 18"),
        (16, 16, "--overlap 16"),
        (16, (4, 4), "--overlap"),
        (-8, None, "--patch-size -8"),
    ],
)
def test_resolve_window_applies_the_same_checks(patch, overlap, message):
    with pytest.raises(CryocapsError, match=message):
        resolve_window({}, 4, patch, overlap)


def test_resolve_window_defaults():
    assert resolve_window({"patch_size": 48}, 8) == ((96, 96, 96), (16, 16, 16))
    assert resolve_window({"patch_size": 100}, 8) == ((104, 104, 104), (16, 16, 16))
    assert resolve_window({}, 4, 20) == ((20, 20, 20), (10, 10, 10))  # overlap capped at half


def test_reflect_indices_mirror_without_repeating_the_edge():
    assert reflect_indices(-3, 8, 5).tolist() == [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]
    assert set(reflect_indices(-40, 40, 3).tolist()) == {0, 1, 2}


# --------------------------------------------------------------------------- blending


@pytest.mark.parametrize("blending", ["gaussian", "mean"])
def test_constant_model_gives_a_constant_map(blending):
    volume = np.random.default_rng(1).normal(size=(23, 41, 37)).astype(np.float32)

    def constant(x):
        return torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1, 1).expand(x.shape[0], 3, *x.shape[2:])

    out = sliding_window(volume, constant, 16, 6, size_multiple=4, blending=blending, batch_size=3)
    assert out.shape == (3, 23, 41, 37)
    np.testing.assert_allclose(
        out, np.broadcast_to([[[[0.2]]], [[[0.5]]], [[[0.3]]]], out.shape), atol=1e-6
    )


@pytest.mark.parametrize(
    "shape,patch,overlap,blending",
    [
        ((23, 41, 37), 16, 6, "gaussian"),
        ((17, 9, 30), (8, 12, 16), (3, 5, 7), "mean"),
        ((33, 20, 21), 12, 9, "gaussian"),  # overlap more than half the patch
        ((19, 19, 19), 8, 0, "gaussian"),  # no overlap
        ((5, 6, 7), 64, 25, "gaussian"),  # patch larger than the volume
    ],
)
def test_position_coded_volume_comes_back_without_seams(shape, patch, overlap, blending):
    # Each voxel holds a distinct value; a pointwise model must return exactly f(value)
    # everywhere, so any window placed or weighted wrongly shows up as a seam.
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / np.prod(shape)
    out = sliding_window(
        volume, pointwise, patch, overlap, size_multiple=4, blending=blending, batch_size=2
    )
    np.testing.assert_allclose(
        out, pointwise(torch.from_numpy(volume)[None, None])[0].numpy(), atol=2e-6
    )


@pytest.mark.parametrize("overlap", [4, pytest.param(10, marks=pytest.mark.slow)])  # 10: ~7 s
def test_streaming_matches_all_in_memory_blending(overlap):
    volume = np.random.default_rng(2).normal(size=(29, 26, 35)).astype(np.float32)
    model = random_conv_model()
    streamed = sliding_window(volume, model, 12, overlap, batch_size=4)
    reference = reference_blend(volume, model, 12, overlap)
    np.testing.assert_allclose(streamed, reference, atol=1e-5)
    # The windows really do disagree near their borders: blending is doing work here.
    single = sliding_window(volume, model, 12, 0, blending="mean")
    assert np.abs(single - streamed).max() > 1e-3


def test_float16_z_carry_stays_within_float16_precision():
    volume = np.random.default_rng(4).normal(size=(40, 21, 23)).astype(np.float32)
    predictor = ProbabilityPredictor(random_conv_model(2), channels_last=False)
    exact = sliding_window(volume, predictor, 12, 6, batch_size=2)
    half = sliding_window(volume, predictor, 12, 6, batch_size=2, z_carry_dtype="float16")
    assert 0 < np.abs(half - exact).max() < 5e-4
    with pytest.raises(CryocapsError, match="z_carry_dtype"):
        sliding_window(volume, predictor, 12, 6, z_carry_dtype="int8")


class CountingSink:
    """A custom sink: counts how often each voxel arrives and sums what arrives there."""

    def __init__(self, shape):
        self.hits = np.zeros(shape, np.int32)
        self.total = np.zeros(shape, np.float64)
        self.z_starts = []
        self.finalized = 0

    def aggregate(self, region, block):
        assert block.dtype == np.float32 and block.shape[1:] == self.hits[region].shape
        self.hits[region] += 1
        self.total[region] += block[0]
        self.z_starts.append(region[0].start)

    def finalize(self):
        self.finalized += 1
        return "done"


@pytest.mark.parametrize("blending", ["gaussian", "mean"])
def test_a_custom_sink_receives_every_voxel_once_with_weights_summing_to_one(blending):
    shape = (30, 22, 18)  # no axis is a multiple of the stride: windows overlap unevenly
    sink = CountingSink(shape)
    assert isinstance(sink, BlendSink)

    def ones(x):
        return torch.ones_like(x)

    result = sliding_window(np.zeros(shape, np.float32), ones, 12, 4, blending=blending, sink=sink)
    assert result == "done" and sink.finalized == 1
    assert (sink.hits == 1).all()
    np.testing.assert_allclose(sink.total, 1.0, atol=1e-6)  # the weights sum to one per voxel
    assert sink.z_starts == sorted(sink.z_starts)
    assert len(set(sink.z_starts)) > 1  # really streamed slab by slab


def test_mrc_sink_writes_maps_and_leaves_nothing_when_the_window_fails(tmp_path):
    from cryocaps.inference import MrcMapsSink
    from cryocaps.io.layout import output_paths

    volume = np.random.default_rng(6).normal(size=(20, 11, 13)).astype(np.float32)
    paths = output_paths(tmp_path / "out", "t", probabilities=True, score=True)
    (tmp_path / "out").mkdir()
    with MrcMapsSink(paths, volume.shape, 3, voxel_size_angstrom=7.0) as sink:
        assert sliding_window(volume, pointwise, 8, 2, sink=sink) is None
    expected = sliding_window(volume, pointwise, 8, 2)
    assert np.array_equal(read_tomogram(paths["labels"]).data, expected.argmax(0))
    np.testing.assert_allclose(
        read_tomogram(paths["score"]).data, expected[1:].max(0), rtol=1e-3, atol=1e-3
    )
    probs = read_tomogram(paths["probabilities"], allow_stack=True)
    np.testing.assert_allclose(probs.data, expected, rtol=1e-3, atol=1e-3)
    assert probs.voxel_size_angstrom == pytest.approx(7.0)

    def failing(x):
        raise RuntimeError("out of memory")

    failed = {key: path.with_name("failed" + path.name[1:]) for key, path in paths.items()}
    with (
        pytest.raises(RuntimeError),
        MrcMapsSink(failed, volume.shape, 3, voxel_size_angstrom=7.0) as sink,
    ):
        sliding_window(volume, failing, 8, 2, sink=sink)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in paths.values()
    )


def test_the_in_memory_sink_is_the_default():
    volume = np.random.default_rng(5).normal(size=(14, 15, 16)).astype(np.float32)
    default = sliding_window(volume, pointwise, 8, 2, batch_size=3)
    explicit = sliding_window(volume, pointwise, 8, 2, batch_size=3, sink=ArraySink(volume.shape))
    assert np.array_equal(default, explicit)


@pytest.mark.parametrize("blending", ["gaussian", "mean"])
def test_a_constant_volume_comes_back_constant(blending):
    # 13 x 29 x 22 voxels: no window side (12) or stride (7) divides any axis.
    volume = np.full((13, 29, 22), 3.25, np.float32)

    def identity(x):
        return x.clone()

    out = sliding_window(volume, identity, 12, 5, blending=blending, batch_size=2)
    assert out.shape == (1, 13, 29, 22)
    np.testing.assert_allclose(out[0], 3.25, rtol=1e-6)


def test_tta_rotations_keep_the_wedge_and_the_hand():
    # Every augmentation flips no axis or exactly two (a 180° rotation): the hand is kept,
    # and sign changes of kx, ky, kz keep a wedge about the Y axis.
    assert TTA_FLIPS[0] == () and all(len(dims) == 2 for dims in TTA_FLIPS[1:])
    assert {frozenset(d) for d in TTA_FLIPS[1:]} == {
        frozenset(p) for p in itertools.combinations((2, 3, 4), 2)
    }
    volume = np.random.default_rng(3).normal(size=(16, 16, 16)).astype(np.float32)
    model = random_conv_model(1)
    plain = sliding_window(volume, ProbabilityPredictor(model, channels_last=False), 16, 4)
    averaged = sliding_window(
        volume, ProbabilityPredictor(model, tta=True, channels_last=False), 16, 4
    )
    x = torch.from_numpy(volume)[None, None]
    with torch.inference_mode():
        expected = sum(torch.softmax(model(x.flip(d)), 1).flip(d) for d in TTA_FLIPS) / 4
    plan = plan_windows(volume.shape, 16, 4)
    assert all(p.n_windows == 2 for p in plan)
    np.testing.assert_allclose(averaged.sum(0), 1.0, atol=1e-5)
    assert np.abs(averaged - plain).max() > 1e-4  # the rotations do change the prediction
    interior = (slice(None), slice(6, 10), slice(6, 10), slice(6, 10))
    # Away from window borders both equal the whole-volume prediction (up to blending).
    assert np.abs(averaged[interior] - expected[0].numpy()[interior]).max() < 0.05


# --------------------------------------------------------------------------- whole tomograms


def save_tiny_unet(folder, voxel_size=10.0, seed=0):
    from cryocaps.modelfile import save_model
    from cryocaps.models import create_model

    torch.manual_seed(seed)
    model = create_model("unet", 3, widths=(4, 4, 4))
    for parameter in model.parameters():  # larger weights: predictions vary across the volume
        parameter.data.mul_(3)
    metadata = {
        "classes": CLASSES,
        "voxel_size_angstrom": voxel_size,
        "patch_size": 16,
        "normalization": NORMALIZATION,
    }
    save_model(folder, model, metadata)
    return folder


@pytest.fixture
def tiny_model(tmp_path):
    return save_tiny_unet(tmp_path / "model")


def write_tomogram(path, shape, voxel_size=10.0, seed=0, origin=(0.0, 0.0, 0.0)):
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3 + 7
    write_volume(path, data, voxel_size, origin_angstrom=origin)
    return path


def test_segment_tomogram_writes_slabs_equal_to_in_memory(tmp_path, tiny_model):
    from cryocaps.inference import normalization_transform
    from cryocaps.modelfile import load_model

    tomo = write_tomogram(tmp_path / "TS_01.mrc", (27, 22, 19), origin=(5.0, 6.0, 7.0))
    model, config = load_model(tiny_model)
    result = segment_tomogram(
        model,
        config,
        tomo,
        tmp_path / "out",
        patch_size=12,
        overlap=4,
        probabilities=True,
        score=True,
    )
    assert result["windows"] == 4 * 3 * 3 and result["shape"] == [27, 22, 19]
    labels = read_tomogram(result["outputs"]["labels"])
    probs = read_tomogram(result["outputs"]["probabilities"], allow_stack=True)
    score = read_tomogram(result["outputs"]["score"])
    for volume in (labels, probs, score):
        assert volume.voxel_size_angstrom == pytest.approx(10.0)
        assert volume.origin_angstrom == pytest.approx((5.0, 6.0, 7.0))
    assert probs.data.dtype == np.float16 and probs.data.shape == (3, 27, 22, 19)

    volume = read_tomogram(tomo).data
    expected = sliding_window(
        volume,
        ProbabilityPredictor(model),
        12,
        4,
        size_multiple=4,
        transform=normalization_transform(volume, config),
    )
    np.testing.assert_allclose(probs.data.astype(np.float32), expected, atol=1e-3)
    label_data = labels.data.astype(np.uint8)
    clear = np.sort(expected, axis=0)[-1] - np.sort(expected, axis=0)[-2] > 1e-2
    assert np.array_equal(label_data[clear], expected.argmax(0)[clear])
    assert len(np.unique(label_data)) > 1  # a real test: the tiny network predicts several classes
    np.testing.assert_allclose(score.data.astype(np.float32), expected[1:].max(0), atol=1e-3)
    assert (tmp_path / "out" / "classes.csv").read_text().splitlines()[1].startswith("1,ribosome")


def test_normalization_reads_a_memory_map_section_by_section_with_the_same_result(tmp_path):
    from cryocaps.inference import normalization_transform
    from cryocaps.preprocess import normalization_stats

    path = write_tomogram(tmp_path / "big.mrc", (40, 30, 20))
    tomogram = read_tomogram(path, mmap=True)
    transform = normalization_transform(tomogram.data, {"normalization": NORMALIZATION})
    stats = normalization_stats(np.array(tomogram.data), (0.5, 99.5))
    block = np.array(tomogram.data[:5])
    expected = (np.clip(block, stats["low"], stats["high"]) - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(transform(block), expected, rtol=1e-5, atol=1e-5)
    tomogram.close()


def test_segment_tomogram_refuses_existing_outputs(tmp_path, tiny_model):
    from cryocaps.modelfile import load_model

    tomo = write_tomogram(tmp_path / "a.mrc", (10, 12, 12))
    model, config = load_model(tiny_model)
    segment_tomogram(model, config, tomo, tmp_path / "out", patch_size=16, overlap=4)
    with pytest.raises(CryocapsError, match="--overwrite"):
        segment_tomogram(model, config, tomo, tmp_path / "out", patch_size=16, overlap=4)


def test_segment_files_sets_up_the_process_through_runtime(tmp_path, tiny_model):
    from cryocaps import runtime
    from cryocaps.inference import segment_files

    tomo = write_tomogram(tmp_path / "a.mrc", (10, 12, 12))
    applied = runtime.keep_freed_blocks()  # what a training earlier in this process would leave
    summary = segment_files([tomo], tiny_model, tmp_path / "out", device="auto", threads=1)
    assert summary["device"] == runtime.resolve_device("auto")
    assert summary["bf16"] == runtime.use_bf16(summary["device"])
    if applied:  # glibc: segmentation hands freed blocks back
        assert runtime.current_policy() == "return"
    assert (tmp_path / "out" / "a_labels.mrc").exists()
    with pytest.raises(CryocapsError, match="--threads 0"):
        segment_files([tomo], tiny_model, tmp_path / "out", threads=0)


@pytest.mark.parametrize("n_files,count", [(7, 3), (4, 4), (2, 5), (10, 1)])
def test_shards_are_disjoint_and_cover_all_inputs(tmp_path, n_files, count):
    files = [tmp_path / f"t{n:02d}.mrc" for n in range(n_files)]
    shards = [select_shard(files, index, count) for index in range(count)]
    assert sorted(p for shard in shards for p in shard) == sorted(files)
    shuffled = list(reversed(files))
    assert [select_shard(shuffled, index, count) for index in range(count)] == shards


def test_shard_parsing_and_slurm_arrays():
    from cryocaps.cli.segment import parse_shard

    assert parse_shard("2/4", {}) == (2, 4)
    assert parse_shard(None, {}) is None
    for bad in ("4/4", "-1/4", "1/0", "a/b", "3"):
        with pytest.raises(CryocapsError, match="--shard"):
            parse_shard(bad, {})
    one_based = {
        "SLURM_ARRAY_TASK_ID": "4",
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_MAX": "4",
    }
    assert parse_shard("4/4", one_based) == (3, 4)
    assert parse_shard("1/4", one_based | {"SLURM_ARRAY_TASK_ID": "1"}) == (0, 4)
    zero_based = {
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "3",
    }
    assert parse_shard("3/4", zero_based) == (3, 4)
    with pytest.raises(CryocapsError, match="SLURM array has 4 tasks"):
        parse_shard("3/5", zero_based)


# --------------------------------------------------------------------------- command line


def test_cli_end_to_end_with_shards_and_skipping(tmp_path, tiny_model, run_cli):
    tomos = tmp_path / "tomos"
    tomos.mkdir()
    for n, shape in enumerate([(13, 21, 18), (16, 16, 16), (9, 30, 11)]):
        write_tomogram(tomos / f"TS_{n}.mrc", shape, seed=n)
    out = tmp_path / "out"
    common = ["-m", tiny_model, "-o", out, "--patch-size", "16", "--overlap", "4", "--threads", "1"]
    done = set()
    for index in range(2):
        result = run_cli("segment", tomos, *common, "--shard", f"{index}/2", "--score")
        assert result.exit_code == 0, result.output
        record = json.loads((out / f"run_shard-{index}-of-2.json").read_text())
        names = {p.split("/")[-1] for p in record["inputs"] for p in [p["path"]]}
        assert names and not names & done
        done |= names
        assert record["results"]["tomograms"][0]["voxels_per_second"] > 0
        assert record["peak_rss_bytes"] > 0
    assert done == {"TS_0.mrc", "TS_1.mrc", "TS_2.mrc"}
    for n in range(3):
        labels = read_tomogram(out / f"TS_{n}_labels.mrc")
        assert labels.shape == read_tomogram(tomos / f"TS_{n}.mrc").shape
        assert (out / f"TS_{n}_score.mrc").exists()
    assert (out / "classes.csv").exists()

    before = (out / "TS_0_labels.mrc").stat().st_mtime_ns
    result = run_cli("segment", tomos, *common, "--score")
    assert result.exit_code == 0 and "Skipped 3" in result.output
    assert (out / "TS_0_labels.mrc").stat().st_mtime_ns == before
    result = run_cli("segment", tomos / "TS_0.mrc", *common, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "TS_0_labels.mrc").stat().st_mtime_ns != before
    assert json.loads((out / "run.json").read_text())["parameters"]["overlap"] == [4, 4, 4]


def assert_one_line_error(result, *fragments):
    """Exit 2, no traceback, one error line naming the fragments (a range click checks comes
    with click's usage hint around it, as every command's option ranges do)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], result.output


def test_cli_refuses_a_tomogram_at_another_voxel_size(tmp_path, tiny_model, run_cli):
    tomo = write_tomogram(tmp_path / "binned.mrc", (12, 12, 12), voxel_size=10.6)
    result = run_cli("segment", tomo, "-m", tiny_model, "-o", tmp_path / "out", "--threads", "1")
    assert_one_line_error(
        result, "cryocaps preprocess", "--voxel-size-angstrom 10", "--ignore-voxel-size"
    )
    assert not (tmp_path / "out" / "binned_labels.mrc").exists()
    # One rule for every command (io.volumes.same_voxel_size): 1% off is refused, 0.5% accepted.
    off = write_tomogram(tmp_path / "off.mrc", (12, 12, 12), voxel_size=10.2)
    result = run_cli("segment", off, "-m", tiny_model, "-o", tmp_path / "out", "--threads", "1")
    assert_one_line_error(result, "off.mrc", "2.0%", "--ignore-voxel-size")
    close = write_tomogram(tmp_path / "close.mrc", (12, 12, 12), voxel_size=10.05)
    result = run_cli("segment", close, "-m", tiny_model, "-o", tmp_path / "out", "--threads", "1")
    assert result.exit_code == 0, result.output
    result = run_cli(
        "segment",
        tomo,
        "-m",
        tiny_model,
        "-o",
        tmp_path / "out",
        "--ignore-voxel-size",
        "--threads",
        "1",
    )
    assert result.exit_code == 0, result.output


def test_cli_missing_or_corrupt_model(tmp_path, tiny_model, run_cli):
    tomo = write_tomogram(tmp_path / "t.mrc", (12, 12, 12))
    out = tmp_path / "out"
    assert_one_line_error(run_cli("segment", tomo, "-m", tmp_path / "nope", "-o", out), "nope")
    (tiny_model / "model.pt").write_bytes(b"not a torch file")
    assert_one_line_error(run_cli("segment", tomo, "-m", tiny_model, "-o", out), "model.pt")
    (tiny_model / "config.json").write_text("{broken")
    assert_one_line_error(run_cli("segment", tomo, "-m", tiny_model, "-o", out), "config.json")
    assert not out.exists() or not any(out.glob("*.mrc"))


@pytest.mark.parametrize(
    "options,fragment",
    [
        (["--overlap", "16", "--patch-size", "16"], "--overlap 16"),
        (["--patch-size", "18"], "--patch-size 18"),
        (["--shard", "2/2"], "--shard 2/2"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--blending", "median"], "--blending 'median'"),
    ],
)
def test_cli_bad_options(tmp_path, tiny_model, run_cli, options, fragment):
    tomo = write_tomogram(tmp_path / "t.mrc", (12, 12, 12))
    result = run_cli(
        "segment", tomo, "-m", tiny_model, "-o", tmp_path / "out", "--threads", "1", *options
    )
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_segment_writes_the_models_label_volumes_beside_the_maps(tmp_path):
    """classes.csv beside the maps carries what the training labels recorded, for picking."""
    from cryocaps.errors import CryocapsError
    from cryocaps.inference.companions import write_model_classes
    from cryocaps.io.class_table import read_classes

    records = [
        {"label": 1, "name": "rod", "radius_angstrom": 100.0, "label_volume_angstrom3": 7.1e5},
        {"label": 2, "name": "ball", "radius_angstrom": 40.0},
    ]
    path = write_model_classes({"classes": records}, tmp_path)
    table = read_classes(path)
    assert table.by_name("rod").label_volume_angstrom3 == 7.1e5
    assert table.by_name("ball").label_volume_angstrom3 is None
    assert write_model_classes({"classes": records}, tmp_path) == path  # same table: kept
    without = [{k: v for k, v in r.items() if k != "label_volume_angstrom3"} for r in records]
    with pytest.raises(CryocapsError, match="--overwrite"):
        write_model_classes({"classes": without}, tmp_path)


def test_segment_warns_of_a_class_covering_far_more_than_its_training_share(
    tmp_path, run_cli, caplog
):
    import json
    import logging
    import re

    from cryocaps.modelfile import load_model

    model_dir = save_tiny_unet(tmp_path / "model")
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    tomo = write_tomogram(tmp_path / "TS_01.mrc", (16, 20, 20))
    model, loaded = load_model(model_dir)
    result = segment_tomogram(model, loaded, tomo, tmp_path / "plain", patch_size=16, overlap=4)
    fractions = result["class_fractions"]
    assert set(fractions) == {"ribosome", "proteasome"} and result["oversegmented"] == []
    labels = read_tomogram(result["outputs"]["labels"]).data.view(np.uint8)
    assert fractions["ribosome"] == pytest.approx(np.mean(labels == 1))
    # the same model, told its classes filled a tiny share of its training labels
    for record in config["classes"]:
        record["label_fraction"] = fractions[record["name"]] / 10 or 1e-6
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="cryocaps"):
        cli = run_cli("segment", tomo, "-m", model_dir, "-o", tmp_path / "out", "--threads", "1")
    assert cli.exit_code == 0, cli.output
    text = cli.output + caplog.text
    warned = [name for name, share in fractions.items() if share > 0]
    assert warned and all(f"class {name} covers" in text for name in warned)
    assert re.search(r"covers \d+\.\d% of the tomogram, \d+\.\dx the \d\.\d\d%", text)
    # off a terminal (a cluster log) each warning is one line, however long
    logged = [line for line in cli.output.splitlines() if "covers" in line]
    assert len(logged) >= len(warned)
    assert all(line.startswith("WARNING ") and line.endswith("unreliable") for line in logged)
