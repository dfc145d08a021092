"""Checkpoints and the run folder: what is saved, how it is loaded, what resume checks.

A checkpoint is the loop's :class:`~cryocaps.training.loop.TrainState` (its
``state_dict()``) under ``"state"``, plus what identifies the run it belongs to
(model, model options, class table, patch size), which ``--resume`` checks
before continuing. Files are loaded with ``torch.load(weights_only=True)``:
tensors, numbers, strings and containers only, never arbitrary objects.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np

from cryocaps.errors import CryocapsError
from cryocaps.preprocess import DEFAULT_CLIP_PERCENTILES

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cryocaps-checkpoint/2"
OLD_CHECKPOINT_FORMAT = "cryocaps-checkpoint/1"  # loop state written field by field (0.1.0)
LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
METRICS_NAME = "metrics.csv"
CURVE_NAME = "learning_curve.png"
RUN_OUTPUTS = (
    METRICS_NAME,
    LAST_CHECKPOINT,
    BEST_CHECKPOINT,
    "model.pt",
    "config.json",
    CURVE_NAME,
)


# --------------------------------------------------------------------------- the run folder


def check_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder holding a previous run unless resuming it or overwriting it."""
    outputs = [METRICS_NAME, LAST_CHECKPOINT, "model.pt", "config.json"]
    if out_dir.exists() and not out_dir.is_dir():
        raise CryocapsError(f"-o {out_dir}: exists and is not a folder")
    if resume:
        return
    existing = [name for name in outputs if (out_dir / name).exists()]
    if existing and not overwrite:
        raise CryocapsError(
            f"-o {out_dir}: holds a previous run ({', '.join(existing)}); use --resume to continue "
            "it or --overwrite to start again"
        )


def clear_run_folder(out_dir: Path) -> None:
    """Delete a previous run's outputs (``--overwrite``): its files must not mix with this run's."""
    for name in RUN_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- random states


class ProcessRng:
    """Python's, numpy's and torch's (CPU, CUDA) global generators, as one state-dict holder."""

    def state_dict(self) -> dict:
        import torch

        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # weights_only-loadable
        states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def load_state_dict(self, states: dict) -> None:
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


class SamplerStreams:
    """The patch samplers' generators of every rank (each rank draws its own stream)."""

    def __init__(self, sampler, ranks):
        self.sampler = sampler
        self.ranks = ranks

    def state_dict(self) -> list:
        return self.ranks.gather(self.sampler.state())  # collective under DDP

    def load_state_dict(self, states: list) -> None:
        if len(states) != self.ranks.world_size:
            log.warning(
                "checkpoint was written by %d process(es), now %d: sampler streams restart",
                len(states),
                self.ranks.world_size,
            )
        self.sampler.set_state(states[self.ranks.rank % len(states)])


# --------------------------------------------------------------------------- files


def run_identity(config, model, data) -> dict:
    """What a checkpoint must share with the run resuming it (see :func:`check_resumable`)."""
    return {
        "model": config.model,
        "model_config": model.config,
        "classes": data.classes.to_records(),
        "patch_size": config.patch_size,
    }


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write atomically (a crash leaves the previous checkpoint in place)."""
    import torch

    from cryocaps.io.files import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded with ``weights_only=True``; CryocapsError if it is not one."""
    import pickle

    import torch

    if not path.is_file():
        raise CryocapsError(f"--resume: no checkpoint {path} (nothing to resume)")
    try:
        checkpoint = torch.load(
            io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CryocapsError(
            f"--resume {path}: not a readable checkpoint ({str(error).splitlines()[0]})"
        ) from error
    if isinstance(checkpoint, dict) and checkpoint.get("format") == OLD_CHECKPOINT_FORMAT:
        checkpoint = _from_format_1(checkpoint)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CryocapsError(f"--resume {path}: not a cryocaps training checkpoint")
    return checkpoint


def _from_format_1(old: dict) -> dict:
    """A checkpoint of cryocaps 0.1.0 (loop state field by field) in today's layout."""
    loop = old["loop"]
    state = {
        name: loop[name]
        for name in (
            "epoch",
            "step_in_epoch",
            "total_steps",
            "epoch_loss_sum",
            "epoch_loss_count",
            "epoch_seconds",
            "train_seconds",
            "best_val_loss",
            "best_epoch",
            "bad_epochs",
        )
    }
    state |= {
        "rows": list(old["history"]),
        "best_score": loop.get("best_score", -loop["best_val_loss"]),
        "model_saved": loop.get("model_saved", False),
        "model": old["model_state"],
        "optimizer": old["optimizer_state"],
        "scheduler": old.get("scheduler_state"),
        "scaler": old.get("scaler_state"),
        "sampler_streams": old["rng"]["samplers"],
        "process_rng": old["rng"]["process"],
    }
    identity = {k: old.get(k) for k in ("model", "model_config", "classes", "patch_size")}
    return {
        "format": CHECKPOINT_FORMAT,
        **identity,
        "world_size": old.get("world_size"),
        "seed": old.get("seed"),
        "state": state,
    }


def check_resumable(checkpoint: dict, where: str, identity: dict) -> None:
    """Refuse to resume a run of another model, model options, class table or patch size."""
    if checkpoint.get("model") != identity["model"]:
        raise CryocapsError(
            f"{where}: checkpoint is of model {checkpoint.get('model')!r}, "
            f"not --model {identity['model']}"
        )
    if checkpoint.get("model_config") != identity["model_config"]:
        raise CryocapsError(
            f"{where}: checkpoint model options {checkpoint.get('model_config')} differ from "
            f"{identity['model_config']}"
        )
    if checkpoint.get("classes") != identity["classes"]:
        raise CryocapsError(f"{where}: checkpoint was trained with another class table")
    if checkpoint.get("patch_size") != identity["patch_size"]:
        raise CryocapsError(
            f"{where}: checkpoint used --patch-size {checkpoint.get('patch_size')}, not "
            f"{identity['patch_size']}"
        )


def model_metadata(config, data, training: dict, annotated_shares: dict | None = None) -> dict:
    """The saved model's config.json beside its weights (what ``segment`` needs to apply it).

    Its class table records each class's share of the training label maps (``label_fraction``),
    which ``segment`` and ``cluster-picks`` compare with what the model makes of a tomogram
    (none where the maps hold unknown voxels: ``ClassTable.with_label_fractions_from_counts``).
    ``annotated_shares``: the estimated annotated share of the classes ``--unannotated auto``
    found partly annotated; their fractions are divided by it (the annotated voxels are that
    share of the class's), so the over-segmentation warning does not fire on right maps.
    """
    classes = data.classes.with_label_fractions_from_counts(data.voxel_counts, data.unknown_voxels)
    if annotated_shares:
        classes = classes.with_label_fractions(
            {
                c.name: round(c.label_fraction / annotated_shares[c.name], 6)
                for c in classes
                if c.name in annotated_shares and c.label_fraction and annotated_shares[c.name] > 0
            }
        )
    return {
        "classes": classes.to_records(),
        "voxel_size_angstrom": data.volumes[0].voxel_size_angstrom,
        "patch_size": config.patch_size,
        "normalization": {
            "method": "percentile_zscore",
            "clip_percentiles": list(DEFAULT_CLIP_PERCENTILES),
            "per_tomogram": True,
        },
        "training": training,
    }
