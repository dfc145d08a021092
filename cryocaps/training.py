"""Training: data loading and checks, the loop, validation, early stopping, checkpoints, resume.

``train(TrainConfig(...))`` reads tomogram/label-map pairs (memory-mapped),
finds particles, splits them into training and validation, and trains a
network with its own loss (``model.compute_loss``) and Adam. Every epoch it
validates (loss and per-class Dice on fixed patches), appends a row to
``metrics.csv``, redraws ``learning_curve.png``, saves the best model
(``config.json`` + ``model.pt``, loadable by ``segment``) and writes
``checkpoint_last.pt`` / ``checkpoint_best.pt`` (weights, optimiser, epoch,
step, all random states). SIGINT/SIGTERM stop after the current step with a
checkpoint, so ``resume`` continues exactly where it stopped; ``max_minutes``
ends the current epoch early when the time left would not cover another step
and a validation, so the last weights are validated (and kept if best). Under ``torchrun`` (WORLD_SIZE > 1) it runs DistributedDataParallel,
each process with its own sampler stream; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cryocaps.classes import ClassTable, read_classes
from cryocaps.errors import CryocapsError
from cryocaps.io.layout import (
    base_tomogram_name,
    expand_volume_paths,
    find_class_table_beside,
    match_label_maps,
    tomogram_name,
)
from cryocaps.io.volumes import label_counts, read_tomogram
from cryocaps.preprocess import DEFAULT_CLIP_PERCENTILES, normalization_stats
from cryocaps.sampling import (
    Augmentation,
    ParticleSet,
    PatchSampler,
    TrainingVolume,
    extract_patch,
    hard_negative_places,
    particles_from_label_map,
    split_particles,
    validation_locations,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cryocaps-checkpoint/1"
LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
METRICS_NAME = "metrics.csv"
CURVE_NAME = "learning_curve.png"
LR_SCHEDULES = ("none", "cosine", "plateau")
VOXEL_SIZE_TOLERANCE = 1e-3  # relative
PAPER = {"lr": 1e-4, "batch_size": 24, "patch_size": 64, "val_fraction": 0.17, "optimizer": "Adam"}


@dataclass
class TrainConfig:
    """Everything a training run needs. Paths may be files or folders of MRC files.

    Defaults are chosen for minutes-long runs on a CPU workstation; the paper's
    values are in ``PAPER`` (Adam lr 1e-4, batch 24, 64³ patches). Measured on
    2 shared CPU cores, U-Net, 3 simulated classes, Dice on a held-out
    tomogram: lr 1e-3 beat 1e-4 after 120 steps (0.45 vs 0.30); 32³ patches beat
    48³ in the same 15 minutes (0.40 vs 0.12; a 48³ step costs ~3.5x); batch 2
    beat batch 8 in the same 10 minutes (0.57 vs 0.51).
    """

    tomograms: list[Path]
    labels: list[Path]
    out_dir: Path
    classes: Path | None = None  # default: classes.csv beside the label maps (or one folder up)
    coords: list[Path] = field(
        default_factory=list
    )  # particle files; default: label-map components
    model: str = "ucaps"
    model_options: dict = field(default_factory=dict)
    patch_size: int | None = None  # None: auto_patch_size (32, more for large particles)
    batch_size: int = 2  # per process
    epochs: int = 300
    steps_per_epoch: int = 100
    lr: float = 1e-3
    lr_schedule: str = "none"
    patience: int = 20  # epochs without a better validation score; 0 = never stop early
    select_by: str = "dice"  # best model = highest mean validation Dice ("dice") or lowest loss ("loss")
    val_fraction: float = 0.17
    val_tomograms: list[str] = field(default_factory=list)
    fold: str | None = None  # "k/K"
    background_fraction: float = 0.3
    hard_negative_fraction: float = 0.5  # of the background patches, share centred on hard negatives
    jitter_voxels: int | None = None  # default: patch_size // 4
    rot90: bool = False
    mirror: bool = False
    intensity_augmentation: bool = True
    max_val_patches: int = 64
    class_weights: bool = True
    max_minutes: float | None = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool | None = None  # None: on where the CPU computes bfloat16 natively
    voxel_size_angstrom: float | None = None
    threads: int | None = None  # torch threads per process; default: CPUs / local processes


def _selection_score(select_by: str, val_loss: float, mean_dice: float) -> float:
    """Higher is better; NaN (no validation voxels of any class) never wins."""
    value = mean_dice if select_by == "dice" else -val_loss
    return value if math.isfinite(value) else -math.inf


# --- data ----------------------------------------------------------------------


def find_class_table(classes: Path | None, label_paths: list[Path]) -> ClassTable:
    """``--classes``, else a classes.csv beside the label maps or one folder up."""
    if classes is not None:
        return read_classes(classes)
    found = find_class_table_beside(label_paths)
    if found is not None:
        log.info("classes from %s", found)
        return read_classes(found)
    raise CryocapsError(
        "no class table: give --classes classes.csv (none found beside the --labels maps)"
    )


def _same_voxel_size(a: float, b: float) -> bool:
    return abs(a - b) <= VOXEL_SIZE_TOLERANCE * max(a, b)


def load_volumes(
    pairs: list[tuple[Path, Path]], n_labels: int, voxel_size_angstrom: float | None
) -> tuple[list[TrainingVolume], list[np.ndarray]]:
    """Memory-map every tomogram and label map, check geometry, compute normalisation stats."""
    volumes, counts = [], []
    for tomogram_path, label_path in pairs:
        tomogram = read_tomogram(tomogram_path, mmap=True, voxel_size_angstrom=voxel_size_angstrom)
        label_map = read_tomogram(
            label_path, mmap=True, voxel_size_angstrom=voxel_size_angstrom, check_finite=False
        )
        if label_map.shape != tomogram.shape:
            raise CryocapsError(
                f"--labels {label_path}: shape {label_map.shape} differs from tomogram {tomogram_path} {tomogram.shape} (z, y, x)"
            )
        if not _same_voxel_size(label_map.voxel_size_angstrom, tomogram.voxel_size_angstrom):
            raise CryocapsError(
                f"--labels {label_path}: voxel size {label_map.voxel_size_angstrom:g} Å differs from "
                f"tomogram {tomogram_path} ({tomogram.voxel_size_angstrom:g} Å)"
            )
        if volumes and not _same_voxel_size(
            tomogram.voxel_size_angstrom, volumes[0].voxel_size_angstrom
        ):
            raise CryocapsError(
                f"--tomograms {tomogram_path}: voxel size {tomogram.voxel_size_angstrom:g} Å differs from "
                f"{volumes[0].name} ({volumes[0].voxel_size_angstrom:g} Å); bring them to one voxel size with "
                "cryocaps preprocess"
            )
        data = label_map.data
        if data.dtype == np.int8:
            data = data.view(np.uint8)  # uint8 maps are stored as MRC mode 0 and read back as int8
        counts.append(label_counts(data, n_labels, label_path))
        volumes.append(
            TrainingVolume(
                name=tomogram.name,
                data=tomogram.data,
                label_map=data,
                stats=normalization_stats(tomogram.data),
                voxel_size_angstrom=tomogram.voxel_size_angstrom,
            )
        )
    return volumes, counts


def particles_from_coords(
    paths: list[Path], volumes: list[TrainingVolume], classes: ClassTable
) -> ParticleSet:
    from cryocaps.io.particles import read_particles
    from cryocaps.io.volumes import TomogramInfo

    infos = [TomogramInfo(v.name, v.shape, v.voxel_size_angstrom) for v in volumes]
    table = read_particles(paths, tomograms=infos, classes=classes)
    index = {v.name: i for i, v in enumerate(volumes)}
    tomo = table["tomo"].astype(str).map(base_tomogram_name)
    known = tomo.isin(list(index))
    if not known.all():
        log.warning(
            "--coords: %d particle(s) in tomograms not being trained on (%s) ignored",
            int((~known).sum()),
            ", ".join(sorted(set(tomo[~known]))[:5]),
        )
    table, tomo = table[known], tomo[known]
    labels = np.array(
        [classes.by_name(classes.name_of(c)).label for c in table["class_name"]], dtype=np.int64
    )
    zyx = np.rint(table[["z", "y", "x"]].to_numpy(dtype=float)).astype(np.int64)
    volume = tomo.map(index).to_numpy(dtype=np.int64)
    inside = np.ones(len(zyx), dtype=bool)
    for i, v in enumerate(volumes):
        rows = volume == i
        inside[rows] = np.all((zyx[rows] >= 0) & (zyx[rows] < np.array(v.shape)), axis=1)
    if not inside.all():
        log.warning("--coords: %d particle(s) outside their tomogram ignored", int((~inside).sum()))
    return ParticleSet(volume[inside], labels[inside], zyx[inside])


AUTO_PATCH_MIN = 32
AUTO_PATCH_MULTIPLE = 8  # fits both networks (unet 4, ucaps 8)
AUTO_PATCH_CONTEXT = 8  # voxels of context around the largest particle (4 per side)


def auto_patch_size(classes: ClassTable, volumes: list[TrainingVolume]) -> int:
    """Default patch side: 32 voxels, or enough for the largest particle plus context.

    ``2 x largest radius + 8`` voxels rounded up to a multiple of 8, at least 32
    (cheap on a CPU: a 48³ patch costs ~3.4x a 32³ one), and at most the
    smallest tomogram side.
    """
    voxel_size = volumes[0].voxel_size_angstrom
    largest = max(c.radius_voxels(voxel_size) for c in classes)
    size = max(
        AUTO_PATCH_MIN,
        math.ceil((2 * largest + AUTO_PATCH_CONTEXT) / AUTO_PATCH_MULTIPLE) * AUTO_PATCH_MULTIPLE,
    )
    smallest_side = min(min(v.shape) for v in volumes)
    if size > smallest_side:
        size = max(AUTO_PATCH_MULTIPLE, smallest_side // AUTO_PATCH_MULTIPLE * AUTO_PATCH_MULTIPLE)
        log.warning(
            "patch size %d voxels: limited by the smallest tomogram side (%d)", size, smallest_side
        )
    log.info("patch size %d voxels (largest particle radius %.1f voxels)", size, largest)
    return size


def parse_fold(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise CryocapsError(f"--fold {text!r}: expected k/K, e.g. 1/6") from None
    if not (n >= 2 and 1 <= k <= n):
        raise CryocapsError(f"--fold {text!r}: need K >= 2 and 1 <= k <= K")
    return k, n


@dataclass
class TrainingData:
    volumes: list[TrainingVolume]
    classes: ClassTable
    train_particles: ParticleSet
    val_particles: ParticleSet
    train_volumes: list[int]
    val_volumes: list[int]
    voxel_counts: np.ndarray  # (n_labels,) in the training volumes
    inputs: list[Path]
    hard_centres: list | None = None  # hard-negative places, computed once by the first sampler


def prepare_data(config: TrainConfig) -> TrainingData:
    """Read, check and split the training data (raises CryocapsError on bad input)."""
    tomogram_paths = expand_volume_paths(config.tomograms, "--tomograms", skip_outputs=True)
    label_paths = expand_volume_paths(config.labels, "--labels", skip_outputs=False)
    pairs = match_label_maps(tomogram_paths, label_paths)
    classes = find_class_table(config.classes, [label for _, label in pairs])
    volumes, counts = load_volumes(pairs, classes.n_labels, config.voxel_size_angstrom)
    names = [v.name for v in volumes]

    if config.patch_size is None:
        config.patch_size = auto_patch_size(classes, volumes)
    for v in volumes:
        if config.patch_size > min(v.shape):
            raise CryocapsError(
                f"--patch-size {config.patch_size}: larger than tomogram {v.name} {v.shape} (z, y, x)"
            )

    val_names = [base_tomogram_name(tomogram_name(n)) for n in config.val_tomograms]
    unknown = [n for n in val_names if n not in names]
    if unknown:
        raise CryocapsError(
            f"--val-tomograms {', '.join(unknown)}: not among --tomograms ({', '.join(names)})"
        )
    val_volumes = [i for i, n in enumerate(names) if n in val_names]
    train_volumes = [i for i, n in enumerate(names) if n not in val_names]
    if val_volumes and not train_volumes:
        raise CryocapsError("--val-tomograms: every tomogram is held out; nothing left to train on")

    labels = [c.label for c in classes]
    if config.coords:
        particles = particles_from_coords(config.coords, volumes, classes)
    else:
        particles = ParticleSet.concat(
            [particles_from_label_map(v.label_map, i, labels) for i, v in enumerate(volumes)]
        )

    fold = parse_fold(config.fold)
    if val_volumes:
        in_val = np.isin(particles.volume, val_volumes)
        train_particles, val_particles = particles.subset(~in_val), particles.subset(in_val)
    else:
        train_mask, val_mask = split_particles(
            particles, val_fraction=config.val_fraction, fold=fold, seed=config.seed
        )
        train_particles, val_particles = particles.subset(train_mask), particles.subset(val_mask)

    train_counts = train_particles.counts()
    missing = [c for c in classes if train_counts.get(c.label, 0) == 0]
    if missing:
        names_text = ", ".join(f"{c.name} (label {c.label})" for c in missing)
        raise CryocapsError(
            f"class {names_text} of {classes.source} has no particles in the training data; "
            "remove it from the class table or add data"
        )
    if len(val_particles) == 0:
        raise CryocapsError(
            "no validation particles: give --val-tomograms, a larger --val-fraction or more particles"
        )
    voxel_counts = np.sum([counts[i] for i in train_volumes], axis=0)
    inputs = [p for pair in pairs for p in pair] + [Path(p) for p in config.coords]
    return TrainingData(
        volumes,
        classes,
        train_particles,
        val_particles,
        train_volumes,
        val_volumes or train_volumes,
        voxel_counts,
        inputs,
    )


# --- distributed ------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> Distributed:
    """Join the process group torchrun set up (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def _resolve_device(name: str, dist: Distributed) -> str:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CryocapsError(f"--device {name}: CUDA is not available on this machine")
        if dist.active and name == "cuda":
            name = f"cuda:{dist.local_rank}"
    return name


def _loss_module(model):
    """``model.compute_loss`` as a module's forward, so DistributedDataParallel syncs its gradients."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, labels, class_weights):
            return self.inner.compute_loss(images, labels, class_weights)

    return LossModule(model)


# --- checkpoints -------------------------------------------------------------------


def _rng_states() -> dict:
    import torch

    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    import torch

    random.setstate(states["python"])
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = dict(
        numpy_state["state"], key=np.array(numpy_state["state"]["key"], dtype=np.uint32)
    )
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    from cryocaps.io.files import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    import pickle

    import torch

    if not path.is_file():
        raise CryocapsError(f"--resume: no checkpoint {path} (nothing to resume)")
    try:
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CryocapsError(
            f"--resume {path}: not a readable checkpoint ({str(error).splitlines()[0]})"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CryocapsError(f"--resume {path}: not a cryocaps training checkpoint")
    return state


# --- the loop ----------------------------------------------------------------------


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop stops after the current step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: stopping after this step and saving a checkpoint", self.signal_name
        )

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


RUN_OUTPUTS = (
    METRICS_NAME,
    LAST_CHECKPOINT,
    BEST_CHECKPOINT,
    "model.pt",
    "config.json",
    CURVE_NAME,
)


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    outputs = [METRICS_NAME, LAST_CHECKPOINT, "model.pt", "config.json"]
    if out_dir.exists() and not out_dir.is_dir():
        raise CryocapsError(f"-o {out_dir}: exists and is not a folder")
    if resume:
        return
    existing = [name for name in outputs if (out_dir / name).exists()]
    if existing and not overwrite:
        raise CryocapsError(
            f"-o {out_dir}: holds a previous run ({', '.join(existing)}); use --resume to continue it "
            "or --overwrite to start again"
        )


def _validate(
    model,
    locations,
    volumes,
    patch_size,
    batch_size,
    class_weights,
    device,
    autocast,
    dist,
    n_labels,
):
    """Mean validation loss and per-label hard Dice over the validation patches (all ranks).

    The loss is the model's own (``compute_loss``); the Dice uses the logits
    of the forward pass that loss ran (caught with a forward hook), so each
    patch goes through the network once.
    """
    import torch

    loss_sum = torch.zeros(1, dtype=torch.float64)
    n_patches = torch.zeros(1, dtype=torch.float64)
    intersection = torch.zeros(n_labels, dtype=torch.float64)
    total = torch.zeros(n_labels, dtype=torch.float64)
    mine = locations[dist.rank :: dist.world_size]
    captured: dict = {}
    hook = model.register_forward_hook(
        lambda module, args, output: captured.__setitem__("output", output)
    )
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(mine), batch_size):
                batch = [
                    extract_patch(volumes[i], corner, patch_size)
                    for i, corner in mine[start : start + batch_size]
                ]
                images = torch.from_numpy(np.stack([b[0] for b in batch])[:, None]).to(device)
                labels = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
                captured.clear()
                with autocast():
                    loss, _ = model.compute_loss(images, labels, class_weights)
                    logits = _logits_from(captured.get("output"), images.shape, n_labels)
                    if logits is None:  # the loss ran no forward we can read: run one
                        logits = model(images)
                loss_sum += float(loss) * len(batch)
                n_patches += len(batch)
                predicted = logits.argmax(1)
                for label in range(n_labels):
                    p, t = predicted == label, labels == label
                    intersection[label] += float((p & t).sum())
                    total[label] += float(p.sum() + t.sum())
    finally:
        hook.remove()
        model.train()
    if dist.active:
        import torch.distributed as tdist

        for tensor in (loss_sum, n_patches, intersection, total):
            tdist.all_reduce(tensor)
    val_loss = float(loss_sum / n_patches.clamp_min(1))
    dice = torch.where(
        total > 0, 2 * intersection / total.clamp_min(1), torch.full_like(total, float("nan"))
    )
    return val_loss, dice.tolist()


def _logits_from(output, image_shape, n_labels: int):
    """(B, K, D, H, W) logits from a caught forward output (a tensor, or a tuple led by the logits)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    expected = (image_shape[0], n_labels, *image_shape[2:])
    if output is None or not hasattr(output, "shape") or tuple(output.shape) != expected:
        return None
    return output


def _write_metrics(out_dir: Path, rows: list[dict]) -> None:
    import pandas as pd

    from cryocaps.io.files import write_text_atomic

    frame = pd.DataFrame(rows)
    write_text_atomic(out_dir / METRICS_NAME, frame.to_csv(index=False, float_format="%.6g"))
    try:
        from cryocaps.plots import plot_learning_curve

        plot_learning_curve(frame, out_dir / CURVE_NAME)
    except Exception as error:  # noqa: BLE001 - a plotting failure must not lose the run
        log.warning("could not draw %s: %s", CURVE_NAME, error)


def _model_metadata(config: TrainConfig, data: TrainingData, extra: dict) -> dict:
    return {
        "classes": data.classes.to_records(),
        "voxel_size_angstrom": data.volumes[0].voxel_size_angstrom,
        "patch_size": config.patch_size,
        "normalization": {
            "method": "percentile_zscore",
            "clip_percentiles": list(DEFAULT_CLIP_PERCENTILES),
            "per_tomogram": True,
        },
        "training": extra,
    }


def train(config: TrainConfig, progress: Callable[..., None] | None = None) -> dict:
    """Train a segmentation network; returns a summary dict (also written to ``run.json`` by the CLI).

    ``progress(n=1, info=str, total=None)`` is called after every step (rank 0 only).
    """
    import torch

    started = time.time()
    config.out_dir = Path(config.out_dir)
    wants_cuda = config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )
    dist = setup_distributed("cuda" if wants_cuda else "cpu")
    device = _resolve_device(config.device, dist)
    threads = config.threads or max(1, (os.cpu_count() or 1) // dist.local_world_size)
    if device == "cpu":
        torch.set_num_threads(threads)
    _check_settings(config)
    _check_out_dir(
        config.out_dir, config.resume, config.overwrite
    )  # every rank, so all fail together
    checkpoint = load_checkpoint(config.out_dir / LAST_CHECKPOINT) if config.resume else None

    data = prepare_data(config)
    n_labels = data.classes.n_labels

    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    from cryocaps.models import create_model

    try:
        model = create_model(config.model, n_labels, **config.model_options)
    except TypeError as error:
        raise CryocapsError(f"--model-option: {error}") from None
    if config.patch_size % model.size_multiple:
        raise CryocapsError(
            f"--patch-size {config.patch_size}: must be a multiple of {model.size_multiple} for {config.model}"
        )
    if checkpoint is not None:
        _check_checkpoint(checkpoint, config, model, data)
    elif config.overwrite and dist.is_main:
        for name in RUN_OUTPUTS:  # a previous run's files must not mix with this one's
            (config.out_dir / name).unlink(missing_ok=True)
    model.to(device)

    jitter = config.patch_size // 4 if config.jitter_voxels is None else config.jitter_voxels
    augmentation = Augmentation(
        mirror=config.mirror, rot90=config.rot90, intensity=config.intensity_augmentation
    )
    sampler = _training_sampler(data, config, jitter, augmentation, [config.seed, dist.rank])
    val_locations = validation_locations(
        data.volumes,
        data.val_particles,
        data.val_volumes,
        config.patch_size,
        background_fraction=config.background_fraction,
        max_patches=config.max_val_patches,
        seed=config.seed,
    )
    class_weights = None
    if config.class_weights:
        class_weights = _class_weights(data, config, jitter).to(device)

    loss_module = _loss_module(model)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        loss_module = DistributedDataParallel(
            loss_module,
            device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = _make_scheduler(optimizer, config)
    use_cuda_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp)
    use_bf16 = config.bf16
    if use_bf16 is None:
        from cryocaps.runtime import native_bf16

        use_bf16 = device == "cpu" and native_bf16()

    def autocast():
        if use_cuda_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        if use_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # loop state (restored on resume)
    epoch, step_in_epoch = 0, 0
    epoch_loss_sum, epoch_loss_count, epoch_seconds = 0.0, 0, 0.0
    rows: list[dict] = []
    best_val_loss, best_epoch, bad_epochs = math.inf, 0, 0
    best_score = -math.inf  # higher is better: mean Dice, or minus the loss
    total_steps, train_seconds = 0, 0.0
    model_saved = False
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        if scheduler is not None and checkpoint.get("scheduler_state"):
            scheduler.load_state_dict(checkpoint["scheduler_state"])
        if checkpoint.get("scaler_state"):
            scaler.load_state_dict(checkpoint["scaler_state"])
        loop = checkpoint["loop"]
        epoch, step_in_epoch = loop["epoch"], loop["step_in_epoch"]
        epoch_loss_sum, epoch_loss_count = loop["epoch_loss_sum"], loop["epoch_loss_count"]
        epoch_seconds = loop["epoch_seconds"]
        best_val_loss, best_epoch, bad_epochs = (
            loop["best_val_loss"],
            loop["best_epoch"],
            loop["bad_epochs"],
        )
        best_score = loop.get("best_score", -best_val_loss)
        total_steps, train_seconds = loop["total_steps"], loop["train_seconds"]
        rows = list(checkpoint["history"])
        model_saved = loop.get("model_saved", False)
        samplers = checkpoint["rng"]["samplers"]
        if len(samplers) != dist.world_size:
            log.warning(
                "checkpoint was written by %d process(es), now %d: sampler streams restart",
                len(samplers),
                dist.world_size,
            )
            sampler.set_state(samplers[dist.rank % len(samplers)])
        else:
            sampler.set_state(samplers[dist.rank])
        _set_rng_states(checkpoint["rng"]["process"])
        log.info("resuming at epoch %d step %d", epoch + 1, step_in_epoch)

    names = data.classes.names
    label_of = [c.label for c in data.classes]
    total_planned = config.epochs * config.steps_per_epoch
    if progress is not None:
        progress(n=epoch * config.steps_per_epoch + step_in_epoch, info="", total=total_planned)

    def gather_sampler_states() -> list:
        if not dist.active:
            return [sampler.state()]
        import torch.distributed as tdist

        states = [None] * dist.world_size
        tdist.all_gather_object(states, sampler.state())
        return states

    def checkpoint_state() -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": config.model,
            "model_config": model.config,
            "classes": data.classes.to_records(),
            "patch_size": config.patch_size,
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
            "scaler_state": scaler.state_dict() if use_cuda_amp else None,
            "history": rows,
            "loop": {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "epoch_loss_sum": epoch_loss_sum,
                "epoch_loss_count": epoch_loss_count,
                "epoch_seconds": epoch_seconds,
                "best_val_loss": best_val_loss,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "total_steps": total_steps,
                "train_seconds": train_seconds,
                "model_saved": model_saved,
            },
            "rng": {"process": _rng_states(), "samplers": gather_sampler_states()},
            "world_size": dist.world_size,
            "seed": config.seed,
        }

    def save_model_now(extra: dict) -> None:
        from cryocaps.modelfile import save_model

        save_model(config.out_dir, model, _model_metadata(config, data, extra))

    stopped = "completed"
    budget = config.max_minutes * 60 if config.max_minutes else None
    last_val_seconds = 0.0
    run_start = time.time()
    model.train()
    with _StopFlag() as stop_flag:
        while epoch < config.epochs:
            epoch_start = time.time() - epoch_seconds
            while step_in_epoch < config.steps_per_epoch:
                step_start = time.time()
                images, labels = sampler.sample(config.batch_size)
                images_t = torch.from_numpy(images).to(device, non_blocking=True)
                labels_t = torch.from_numpy(labels).to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss, _parts = loss_module(images_t, labels_t, class_weights)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise CryocapsError(
                        f"training diverged (loss {loss_value}) at epoch {epoch + 1}; try a lower --lr"
                    )
                epoch_loss_sum += loss_value
                epoch_loss_count += 1
                step_in_epoch += 1
                total_steps += 1
                step_seconds = time.time() - step_start
                train_seconds += step_seconds
                if progress is not None:
                    val_text = f" val {rows[-1]['val_loss']:.3f}" if rows else ""
                    progress(
                        n=1,
                        info=f"epoch {epoch + 1}/{config.epochs} loss {epoch_loss_sum / epoch_loss_count:.3f}{val_text}",
                    )
                # stop on a signal, or when the time left would not cover one more step and a validation
                reason = stop_flag.signal_name
                if reason is None and budget is not None:
                    val_seconds = last_val_seconds or _first_validation_estimate(
                        len(val_locations) / dist.world_size, config.batch_size, step_seconds
                    )
                    needed = step_seconds + val_seconds + 5
                    if time.time() - run_start + needed > budget:
                        reason = "max_minutes"
                reason = _agree_on_stop(reason, dist)
                if reason is not None:
                    stopped = reason
                    break
            if step_in_epoch < config.steps_per_epoch and stopped != "max_minutes":
                # a signal mid-epoch: checkpoint this exact point below (resume continues it)
                epoch_seconds = time.time() - epoch_start
                break
            # out of time mid-epoch: the epoch ends early, so the last weights are validated

            # end of epoch: validate, record, checkpoint
            val_start = time.time()
            val_loss, dice = _validate(
                model,
                val_locations,
                data.volumes,
                config.patch_size,
                config.batch_size,
                class_weights,
                device,
                autocast,
                dist,
                n_labels,
            )
            last_val_seconds = time.time() - val_start
            train_loss = _mean_over_ranks(epoch_loss_sum / max(1, epoch_loss_count), dist)
            lr = optimizer.param_groups[0]["lr"]
            class_dice = [dice[label] for label in label_of]
            row = {
                "epoch": epoch + 1,
                "steps": step_in_epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
            }
            row |= {f"dice_{name}": d for name, d in zip(names, class_dice, strict=True)}
            row |= {
                "mean_dice": float(np.nanmean(class_dice))
                if not all(map(math.isnan, class_dice))
                else float("nan")
            }
            row |= {
                "lr": lr,
                "seconds": time.time() - epoch_start,
                "elapsed_seconds": time.time() - started,
            }
            rows.append(row)
            score = _selection_score(config.select_by, val_loss, row["mean_dice"])
            improved = score > best_score
            if improved:
                best_score, best_val_loss, best_epoch, bad_epochs = score, val_loss, epoch + 1, 0
            else:
                bad_epochs += 1
            if scheduler is not None:
                if config.lr_schedule == "plateau":
                    scheduler.step(val_loss)
                else:
                    scheduler.step()
            epoch += 1
            step_in_epoch, epoch_loss_sum, epoch_loss_count, epoch_seconds = 0, 0.0, 0, 0.0
            if config.patience and bad_epochs >= config.patience and stopped == "completed":
                stopped = "early_stopping"
            state = checkpoint_state()  # collective under DDP: every rank takes part
            if dist.is_main:
                if improved:
                    save_model_now(
                        {
                            "epoch": best_epoch,
                            "val_loss": best_val_loss,
                            "dice": dict(zip(names, class_dice, strict=True)),
                        }
                    )
                    model_saved = True
                    state["loop"]["model_saved"] = True
                    _save_checkpoint(config.out_dir / BEST_CHECKPOINT, state)
                _save_checkpoint(config.out_dir / LAST_CHECKPOINT, state)
                _write_metrics(config.out_dir, rows)
            model_saved = model_saved or improved
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f, mean Dice %.3f%s",
                epoch,
                train_loss,
                val_loss,
                row["mean_dice"],
                " (best)" if improved else "",
            )
            if stopped != "completed":
                break

        if stopped in ("SIGINT", "SIGTERM", "max_minutes") and step_in_epoch > 0:
            state = checkpoint_state()
            if dist.is_main:
                if not model_saved:
                    save_model_now(
                        {"epoch": None, "note": "stopped before the first validation; last weights"}
                    )
                    model_saved = True
                    state["loop"]["model_saved"] = True
                _save_checkpoint(config.out_dir / LAST_CHECKPOINT, state)

    seconds = time.time() - started
    done_this_run = max(1, total_steps - (checkpoint["loop"]["total_steps"] if checkpoint else 0))
    run_train_seconds = train_seconds - (checkpoint["loop"]["train_seconds"] if checkpoint else 0.0)
    best_row = next((r for r in rows if r["epoch"] == best_epoch), None)
    result = {
        "out_dir": str(config.out_dir),
        "model": config.model,
        "device": device,
        "bf16": bool(use_bf16) and not use_cuda_amp,
        "world_size": dist.world_size,
        "stopped": stopped,
        "epochs_done": epoch,
        "steps_in_partial_epoch": step_in_epoch,
        "steps_done": total_steps,
        "steps_this_run": total_steps - (checkpoint["loop"]["total_steps"] if checkpoint else 0),
        "seconds": seconds,
        "seconds_per_step": run_train_seconds / done_this_run,
        "samples_per_second": done_this_run
        * config.batch_size
        * dist.world_size
        / max(run_train_seconds, 1e-9),
        "best_epoch": best_epoch,
        "best_val_loss": best_val_loss if math.isfinite(best_val_loss) else None,
        "best_dice": {n: best_row[f"dice_{n}"] for n in names} if best_row else {},
        "best_mean_dice": best_row["mean_dice"] if best_row else None,
        "n_train_particles": data.train_particles.counts(),
        "n_val_particles": data.val_particles.counts(),
        "n_val_patches": len(val_locations),
        "class_weights": class_weights.tolist() if class_weights is not None else None,
        "history": rows,
        "inputs": [str(p) for p in data.inputs],
        "rank": dist.rank,
    }
    for volume in data.volumes:  # close memory maps
        volume.data = volume.label_map = None
    if dist.active:
        import torch.distributed as tdist

        tdist.barrier()
    return result


def _check_settings(config: TrainConfig) -> None:
    checks = [
        (
            config.patch_size is None or config.patch_size >= 8,
            f"--patch-size {config.patch_size}: must be >= 8 voxels",
        ),
        (config.batch_size >= 1, f"--batch-size {config.batch_size}: must be >= 1"),
        (config.epochs >= 1, f"--epochs {config.epochs}: must be >= 1"),
        (config.steps_per_epoch >= 1, f"--steps-per-epoch {config.steps_per_epoch}: must be >= 1"),
        (config.lr > 0, f"--lr {config.lr}: must be > 0"),
        (
            0 <= config.background_fraction < 1,
            f"--background-fraction {config.background_fraction}: must be in [0, 1)",
        ),
        (
            0 <= config.hard_negative_fraction <= 1,
            f"--hard-negatives {config.hard_negative_fraction}: must be in [0, 1]",
        ),
        (0 < config.val_fraction < 1, f"--val-fraction {config.val_fraction}: must be in (0, 1)"),
        (config.patience >= 0, f"--patience {config.patience}: must be >= 0"),
        (config.select_by in ("dice", "loss"), f"--select-by {config.select_by!r}: choose dice or loss"),
        (
            config.lr_schedule in LR_SCHEDULES,
            f"--lr-schedule {config.lr_schedule!r}: choose {', '.join(LR_SCHEDULES)}",
        ),
        (
            config.max_minutes is None or config.max_minutes > 0,
            f"--max-minutes {config.max_minutes}: must be > 0",
        ),
        (config.max_val_patches >= 1, f"--max-val-patches {config.max_val_patches}: must be >= 1"),
        (not (config.fold and config.val_tomograms), "give --fold or --val-tomograms, not both"),
    ]
    for ok, message in checks:
        if not ok:
            raise CryocapsError(message)
    parse_fold(config.fold)


def _check_checkpoint(checkpoint: dict, config: TrainConfig, model, data: TrainingData) -> None:
    where = f"--resume {config.out_dir / LAST_CHECKPOINT}"
    if checkpoint.get("model") != config.model:
        raise CryocapsError(
            f"{where}: checkpoint is of model {checkpoint.get('model')!r}, not --model {config.model}"
        )
    if checkpoint.get("model_config") != model.config:
        raise CryocapsError(
            f"{where}: checkpoint model options {checkpoint.get('model_config')} differ from {model.config}"
        )
    if checkpoint.get("classes") != data.classes.to_records():
        raise CryocapsError(f"{where}: checkpoint was trained with another class table")
    if checkpoint.get("patch_size") != config.patch_size:
        raise CryocapsError(
            f"{where}: checkpoint used --patch-size {checkpoint.get('patch_size')}, not {config.patch_size}"
        )


def _first_validation_estimate(n_patches: float, batch_size: int, step_seconds: float) -> float:
    """Seconds a validation may take before one was timed: a forward is ~1/3 of a training step."""
    return math.ceil(n_patches / batch_size) * step_seconds / 3


def _agree_on_stop(reason: str | None, dist: Distributed) -> str | None:
    """Under DDP every rank must stop at the same step: stop if any rank wants to."""
    if not dist.active:
        return reason
    import torch
    import torch.distributed as tdist

    codes = {None: 0, "max_minutes": 1, "SIGTERM": 2, "SIGINT": 3}
    flag = torch.tensor([codes.get(reason, 2)])
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return {v: k for k, v in codes.items()}[int(flag)]


def _mean_over_ranks(value: float, dist: Distributed) -> float:
    if not dist.active:
        return value
    import torch
    import torch.distributed as tdist

    tensor = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(tensor)
    return float(tensor) / dist.world_size


def _make_scheduler(optimizer, config: TrainConfig):
    import torch

    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs, eta_min=config.lr * 0.01
        )
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, config.patience // 3)
        )
    return None


def _training_sampler(data, config: TrainConfig, jitter: int, augmentation, seed: list[int]) -> PatchSampler:
    """Patches of the training particles and background, as configured."""
    if config.hard_negative_fraction > 0 and data.hard_centres is None:
        data.hard_centres = hard_negative_places(data.volumes, data.train_volumes)
    return PatchSampler(
        data.volumes,
        data.train_particles,
        data.train_volumes,
        config.patch_size,
        background_fraction=config.background_fraction,
        hard_negative_fraction=config.hard_negative_fraction,
        hard_centres=data.hard_centres,
        jitter_voxels=jitter,
        augmentation=augmentation,
        seed=np.random.SeedSequence(seed),
    )


def _class_weights(data: TrainingData, config: TrainConfig, jitter: int, n_patches: int = 128):
    """Inverse-frequency weights from the label voxels of patches the sampler draws.

    The sampler over-represents particles compared to whole tomograms, so the
    frequencies are measured on a sample of its patches (a separate random
    stream, so training draws are unaffected).
    """
    from cryocaps.models.losses import class_weights_from_frequencies

    probe = _training_sampler(data, config, jitter, None, [config.seed, 31337])
    counts = np.zeros(data.classes.n_labels, dtype=np.int64)
    for _ in range(n_patches):
        index, corner = probe.next_location()
        z, y, x = corner
        p = config.patch_size
        block = np.asarray(data.volumes[index].label_map[z : z + p, y : y + p, x : x + p]).astype(
            np.int64
        )
        counts += np.bincount(block.ravel(), minlength=len(counts))
    # labels between the table's labels (gaps) never occur: give them the background count
    present = np.array([0] + [c.label for c in data.classes])
    absent = np.setdiff1d(np.arange(len(counts)), present)
    counts[absent] = counts[0]
    return class_weights_from_frequencies(counts)


def config_dict(config: TrainConfig) -> dict:
    """The settings as JSON-able values (for run.json)."""
    return {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
        for k, v in asdict(config).items()
    }
