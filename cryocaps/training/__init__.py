"""Training: settings, data, patches, the loop (Trainer + one state dataclass), checkpoints.

``train(TrainConfig(tomograms=..., labels=..., out_dir=...))`` is the whole
stage; the rest is public for tests, notebooks and benchmarks. Submodules:
``config`` (TrainConfig, checks, PAPER), ``data`` (reading and splitting),
``sampling`` (patches, augmentation, hard negatives), ``mining`` (false
positives mined between epochs), ``loop`` (Trainer, TrainState, train),
``hooks`` (loop features), ``validation``, ``checkpoint``, ``ranks`` (torchrun
collectives). Nothing here imports torch until a function runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
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

# Public name -> submodule. Imported on first use (PEP 562), so that the CLI can read
# TrainConfig's defaults for --help without loading the data and loop modules.
_WHERE = {
    "PAPER": "config",
    "TrainConfig": "config",
    "config_dict": "config",
    "defaults": "config",
    "TrainingData": "data",
    "auto_patch_size": "data",
    "prepare_data": "data",
    "TrainState": "loop",
    "Trainer": "loop",
    "train": "loop",
    "Augmentation": "sampling",
    "ParticleSet": "sampling",
    "PatchSampler": "sampling",
    "TrainingVolume": "sampling",
    "split_particles": "sampling",
    "validation_locations": "sampling",
}
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
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
