"""Training data: tomogram/label-map pairs, particle centres, patch size, train/validation split.

:func:`prepare_data` reads and checks everything a run trains on (memory-mapped
volumes, class table, particles from label-map components or ``--coords``) and
holds out the validation regions (:mod:`cryocaps.training.holdout`);
:func:`training_sampler` and :func:`class_weights` build what the loop draws its
patches and loss weights from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryocaps.classes import IGNORE_LABEL, ClassTable
from cryocaps.errors import CryocapsError
from cryocaps.io.class_table import load_class_table_beside
from cryocaps.io.copick_project import parse_tomogram_spec
from cryocaps.io.layout import (
    base_tomogram_name,
    expand_volume_paths,
    match_label_maps,
    tomogram_name,
)
from cryocaps.io.volumes import check_same_voxel_size, label_counts, read_tomogram
from cryocaps.preprocess import normalization_stats
from cryocaps.training.config import (
    AUTO_PATCH_CONTEXT,
    AUTO_PATCH_MIN,
    AUTO_PATCH_MULTIPLE,
    TrainConfig,
    parse_fold,
)
from cryocaps.training.holdout import Holdout, hold_out
from cryocaps.training.sampling import (
    Augmentation,
    ParticleSet,
    PatchSampler,
    TrainingVolume,
    hard_negative_places,
    particles_from_label_map,
)

log = logging.getLogger(__name__)

# An estimated annotated share below this counts as this (one noisy estimate must not weight a
# class up fifty-fold).
MIN_SHARE = 0.1


def find_class_table(classes: Path | None, label_paths: list[Path]) -> ClassTable:
    """``--classes``, else a classes.csv beside the label maps or one folder up."""
    table, source = load_class_table_beside(label_paths, classes, None)
    if classes is None:
        log.info("classes from %s", source)
    return table


def load_volumes(
    pairs: list[tuple[Path, Path]], n_labels: int, voxel_size_angstrom: float | None
) -> tuple[list[TrainingVolume], list[np.ndarray]]:
    """Memory-map every tomogram and label map, check geometry, compute normalisation stats.

    Returns the volumes and, for each, its voxels per label (n_labels,).
    """
    volumes, counts = [], []
    for tomogram_path, label_path in pairs:
        tomogram = read_tomogram(tomogram_path, mmap=True, voxel_size_angstrom=voxel_size_angstrom)
        label_map = read_tomogram(
            label_path, mmap=True, voxel_size_angstrom=voxel_size_angstrom, check_finite=False
        )
        if label_map.shape != tomogram.shape:
            raise CryocapsError(
                f"--labels {label_path}: shape {label_map.shape} differs from tomogram "
                f"{tomogram_path} {tomogram.shape} (z, y, x)"
            )
        check_same_voxel_size(
            f"--labels {label_path}",
            label_map.voxel_size_angstrom,
            f"tomogram {tomogram_path}",
            tomogram.voxel_size_angstrom,
        )
        if volumes:
            check_same_voxel_size(
                f"--tomograms {tomogram_path}",
                tomogram.voxel_size_angstrom,
                volumes[0].name,
                volumes[0].voxel_size_angstrom,
                hint="; bring them to one voxel size with cryocaps preprocess",
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
    """Particle centres from particle files, in the volumes trained on (others are ignored)."""
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


@dataclass
class TrainingData:
    """What a run trains and validates on.

    Training patches come from ``holdout.train_views`` (views of ``volumes`` that
    never reach a held-out region): ``train_particles`` index those views, in their
    voxels. ``val_particles`` index ``volumes``; ``holdout.regions`` are what
    validation segments and scores.
    """

    volumes: list[TrainingVolume]
    classes: ClassTable
    holdout: Holdout
    voxel_counts: np.ndarray  # (n_labels,) in the volumes trained on
    inputs: list[Path]
    unknown_voxels: int = 0  # labelled IGNORE_LABEL in the volumes trained on
    hard_centres: list | None = None  # hard-negative places, computed once by the first sampler
    # regions no training patch may overlap (sampling.ExcludedBox: volume, lower, upper corner)
    excluded_boxes: list = field(default_factory=list)

    @property
    def train_particles(self) -> ParticleSet:
        return self.holdout.train_particles

    @property
    def val_particles(self) -> ParticleSet:
        return self.holdout.val_particles

    @property
    def train_views(self) -> list[TrainingVolume]:
        return self.holdout.train_views

    def close(self) -> None:
        """Drop the memory maps."""
        for volume in [*self.volumes, *self.holdout.train_views]:
            volume.data = volume.label_map = None


def prepare_data(config: TrainConfig) -> TrainingData:
    """Read, check and split the training data (raises CryocapsError on bad input).

    Sets ``config.patch_size`` when it is None (:func:`auto_patch_size`).
    """
    tomogram_paths = expand_volume_paths(config.tomograms, "--tomograms", skip_outputs=True)
    label_paths = expand_volume_paths(config.labels, "--labels", skip_outputs=False)
    # a copick project names every run; those without picks (no label map) are not trained on
    from_project = any(parse_tomogram_spec(path) is not None for path in config.tomograms)
    pairs = match_label_maps(tomogram_paths, label_paths, skip_unlabelled=from_project)
    classes = find_class_table(config.classes, [label for _, label in pairs])
    volumes, counts = load_volumes(pairs, classes.n_labels, config.voxel_size_angstrom)
    if config.patch_size is None:
        config.patch_size = auto_patch_size(classes, volumes)
    for v in volumes:
        if config.patch_size > min(v.shape):
            raise CryocapsError(
                f"--patch-size {config.patch_size}: larger than tomogram {v.name} {v.shape} "
                "(z, y, x)"
            )
    train_volumes, val_volumes = _held_out_volumes(config.val_tomograms, [v.name for v in volumes])
    if config.coords:
        particles = particles_from_coords(config.coords, volumes, classes)
    else:
        labels = [c.label for c in classes]
        particles = ParticleSet.concat(
            [particles_from_label_map(v.label_map, i, labels) for i, v in enumerate(volumes)]
        )
    holdout = hold_out(
        volumes,
        particles,
        patch_size=config.patch_size,
        val_fraction=config.val_fraction,
        fold=parse_fold(config.fold),
        val_volumes=val_volumes,
        max_voxels=config.max_val_voxels,
    )
    log.info(
        "validation: %s; %d training and %d validation particles",
        holdout.description,
        len(holdout.train_particles),
        len(holdout.val_particles),
    )
    _check_split(classes, holdout.train_particles, holdout.val_particles)
    return TrainingData(
        volumes,
        classes,
        holdout,
        voxel_counts=np.sum([counts[i] for i in train_volumes], axis=0),
        inputs=[p for pair in pairs for p in pair] + [Path(p) for p in config.coords],
        unknown_voxels=sum(
            math.prod(volumes[i].shape) - int(counts[i].sum()) for i in train_volumes
        ),
    )


def _held_out_volumes(val_tomograms: list[str], names: list[str]) -> tuple[list[int], list[int]]:
    """Indices of the training volumes and of the ``--val-tomograms`` (empty: none held out)."""
    val_names = [base_tomogram_name(tomogram_name(n)) for n in val_tomograms]
    unknown = [n for n in val_names if n not in names]
    if unknown:
        raise CryocapsError(
            f"--val-tomograms {', '.join(unknown)}: not among --tomograms ({', '.join(names)})"
        )
    val_volumes = [i for i, n in enumerate(names) if n in val_names]
    train_volumes = [i for i, n in enumerate(names) if n not in val_names]
    if val_volumes and not train_volumes:
        raise CryocapsError("--val-tomograms: every tomogram is held out; nothing left to train on")
    return train_volumes, val_volumes


def _check_split(classes: ClassTable, train: ParticleSet, val: ParticleSet) -> None:
    """Every class must have training particles, and something must be left to validate on."""
    train_counts = train.counts()
    missing = [c for c in classes if train_counts.get(c.label, 0) == 0]
    if missing:
        names_text = ", ".join(f"{c.name} (label {c.label})" for c in missing)
        raise CryocapsError(
            f"class {names_text} of {classes.source} has no particles in the training data; "
            "remove it from the class table or add data"
        )
    if len(val) == 0:
        raise CryocapsError(
            "no validation particles: give --val-tomograms, a larger --val-fraction or more "
            "particles"
        )


def jitter_voxels(config: TrainConfig) -> int:
    """Random shift of particle patches: ``--jitter-voxels``, else a quarter of the patch side."""
    return config.patch_size // 4 if config.jitter_voxels is None else config.jitter_voxels


def training_sampler(
    data: TrainingData, config: TrainConfig, seed: list[int], augment: bool = True
) -> PatchSampler:
    """Patches of the training particles and background, as configured.

    ``seed`` seeds the sampler's own stream (``[config.seed, rank]`` for training);
    ``augment=False`` draws plain patches (for measuring class frequencies).
    """
    views = data.train_views
    if config.hard_negative_fraction > 0 and data.hard_centres is None:
        data.hard_centres = hard_negative_places(views, list(range(len(views))))
    augmentation = None
    if augment:
        augmentation = Augmentation(
            mirror=config.mirror, rot90=config.rot90, intensity=config.intensity_augmentation
        )
    return PatchSampler(
        views,
        data.train_particles,
        list(range(len(views))),
        config.patch_size,
        background_fraction=config.background_fraction,
        hard_negative_fraction=config.hard_negative_fraction,
        hard_centres=data.hard_centres,
        mined_negative_fraction=config.mined_negative_fraction,
        excluded_boxes=data.excluded_boxes,
        jitter_voxels=jitter_voxels(config),
        augmentation=augmentation,
        seed=np.random.SeedSequence(seed),
    )


def class_weights(
    data: TrainingData, config: TrainConfig, n_patches: int = 128, shares: dict | None = None
):
    """Inverse-frequency weights, (n_labels,) tensor, from the labels of patches the sampler draws.

    The sampler over-represents particles compared to whole tomograms, so the
    frequencies are measured on a sample of its patches (a separate random
    stream, so training draws are unaffected). ``shares``: {label: estimated annotated share}
    of partly annotated classes, whose counts are divided by it - the frequency the class would
    have fully annotated, so that annotating less does not weight it up against the background.
    """
    from cryocaps.models.losses import class_weights_from_frequencies

    probe = training_sampler(data, config, [config.seed, 31337], augment=False)
    counts = np.zeros(data.classes.n_labels, dtype=np.int64)
    p = config.patch_size
    for _ in range(n_patches):
        index, (z, y, x) = probe.next_location()
        block = np.asarray(data.train_views[index].label_map[z : z + p, y : y + p, x : x + p])
        block = block[block != IGNORE_LABEL]  # unknown voxels (partial annotations) count nowhere
        counts += np.bincount(block.astype(np.int64).ravel(), minlength=len(counts))
    # labels between the table's labels (gaps) never occur: give them the background count
    present = np.array([0] + [c.label for c in data.classes])
    absent = np.setdiff1d(np.arange(len(counts)), present)
    counts[absent] = counts[0]
    counts = counts.astype(np.float64)
    for label, share in (shares or {}).items():
        counts[label] /= max(share, MIN_SHARE)
    return class_weights_from_frequencies(counts, power=config.class_weight_power)
