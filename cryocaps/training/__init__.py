"""Training: settings, data, patches, the loop (Trainer + one state dataclass), checkpoints.

``train(TrainConfig(tomograms=..., labels=..., out_dir=...))`` is the whole
stage; the rest is public for tests, notebooks and benchmarks. Submodules:
``config`` (TrainConfig, checks, PAPER), ``data`` (reading and splitting),
``sampling`` (patches, augmentation, hard negatives), ``loop`` (Trainer,
TrainState, train), ``hooks`` (loop features), ``validation``,
``checkpoint``, ``ranks`` (torchrun collectives). Nothing here imports torch
until a function runs.
"""

from cryocaps.training.config import PAPER, TrainConfig, config_dict, defaults
from cryocaps.training.data import TrainingData, auto_patch_size, prepare_data
from cryocaps.training.loop import Trainer, TrainState, train
from cryocaps.training.sampling import (
    Augmentation,
    ParticleSet,
    PatchSampler,
    TrainingVolume,
    split_particles,
    validation_locations,
)

__all__ = [
    "PAPER",
    "Augmentation",
    "ParticleSet",
    "PatchSampler",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingData",
    "TrainingVolume",
    "auto_patch_size",
    "config_dict",
    "defaults",
    "prepare_data",
    "split_particles",
    "train",
    "validation_locations",
]
