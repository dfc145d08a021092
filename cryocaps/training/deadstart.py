"""A network that stopped depending on its input in its first epochs starts again.

A U-Net without normalisation layers can lose every unit of one ReLU layer in its
first steps: the layer's biases are pushed so far down that no input reaches its
output, everything after it is a constant, and no gradient ever reaches the
layers before it again. Such a run never learns, however long it trains: on the
benchmark family (draw 4, 30% annotated, seed 4) the U-Net's first block died
within the first 60 steps; its loss stayed at 2.24 for 27 epochs and it scored
macro F1 0.01, where the same data fully annotated scored 0.98. One of 13 seeds
tried there died, the others learned. After each of the first
:data:`CHECK_EPOCHS` epochs :class:`DeadStartCheck` feeds the network two
different inputs; (nearly) identical outputs mean it ignores its input, and ``train``
starts again from fresh weights with another seed (at most :data:`MAX_RESTARTS`
times), in what is left of ``--max-minutes``. A run that learns is not touched:
the check draws its inputs from its own generator, not the run's.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from cryocaps.errors import CryocapsError
from cryocaps.training.hooks import Hook

log = logging.getLogger(__name__)

CHECK_EPOCHS = 3  # epochs after which the check runs (a dead start dies in the first steps)
MAX_RESTARTS = 2
DEAD_RATIO = 0.01  # input dependence below which a network is dead (see ignores_its_input)
SEED_STEP = 7919  # the next attempt's seed: far from the neighbouring seeds users pick


class DeadNetwork(Exception):
    """The network's output no longer depends on its input (raised out of the loop)."""

    def __init__(self, epoch: int):
        super().__init__(f"the network ignores its input after epoch {epoch}")
        self.epoch = epoch


def ignores_its_input(model, patch_size: int, device, autocast) -> bool:
    """Whether ``model``'s outputs for two different random inputs differ by less than
    :data:`DEAD_RATIO` of how much an output varies across the patch (the dead first block of
    the draw-4 run: 0.0002; living networks there, from their first step on: 0.33-0.58)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (1, 1, patch_size, patch_size, patch_size)
    inputs = [torch.randn(shape, generator=generator).to(device) for _ in range(2)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            first, second = (model(x) for x in inputs)
    finally:
        model.train(was_training)
    first, second = first.float(), second.float()
    change = (first - second).abs().mean()
    spread = first.std(dim=tuple(range(2, first.ndim))).mean()
    return bool(change <= DEAD_RATIO * spread + 1e-12)


class DeadStartCheck(Hook):
    """After each of the first :data:`CHECK_EPOCHS` epochs: raise :class:`DeadNetwork` when the
    network (the trained weights, not their average) ignores its input."""

    def on_epoch_end(self, trainer, row: dict, improved: bool) -> None:
        if trainer.state.epoch > CHECK_EPOCHS:
            return
        dead = ignores_its_input(
            trainer.state.model, trainer.config.patch_size, trainer.device, trainer.autocast
        )
        if trainer.ranks.mean(float(dead)) > 0.5:  # the same weights on every rank
            raise DeadNetwork(trainer.state.epoch)


def fresh_start(config, dead: DeadNetwork, started: float, restarts: list[dict]):
    """The settings of the next attempt after ``dead`` (another seed, the time left of
    ``--max-minutes``), noted in ``restarts``; a one-line error after :data:`MAX_RESTARTS`."""
    restarts.append({"seed": config.seed, "epoch": dead.epoch})
    seeds = ", ".join(str(r["seed"]) for r in restarts)
    if len(restarts) > MAX_RESTARTS:
        raise CryocapsError(
            f"train: the network stopped depending on its input within {CHECK_EPOCHS} epochs "
            f"with every seed tried ({seeds}; dead ReLU layers); try a lower --lr"
        )
    seed = (config.seed + SEED_STEP) % 2**32
    changes = {"seed": seed}
    if config.max_minutes:
        changes["max_minutes"] = max(config.max_minutes - (time.time() - started) / 60, 0.1)
    log.warning(
        "the network stopped depending on its input after epoch %d (seed %d: a dead ReLU "
        "layer, it would never learn); starting again from fresh weights with seed %d",
        dead.epoch,
        config.seed,
        seed,
    )
    return dataclasses.replace(config, **changes)
