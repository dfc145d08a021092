"""A network that stops depending on its input in its first epochs starts again."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from test_training import _config, dataset  # noqa: F401 - the fixture

from cryocaps.errors import CryocapsError


def _unet(dead: bool):
    import torch

    from cryocaps.models.unet import UNet3D

    torch.manual_seed(0)
    model = UNet3D(3, widths=(4, 4, 4))
    if dead:  # every unit of the first block's second ReLU below zero for any input
        with torch.no_grad():
            model.enc1[2].bias.fill_(-1e3)
    return model


def test_a_dead_first_block_is_told_from_a_living_network():
    from contextlib import nullcontext

    from cryocaps.training.deadstart import ignores_its_input

    assert ignores_its_input(_unet(dead=True), 16, "cpu", nullcontext)
    assert not ignores_its_input(_unet(dead=False), 16, "cpu", nullcontext)
    model = _unet(dead=False).train()
    ignores_its_input(model, 16, "cpu", nullcontext)
    assert model.training  # left as it was found


def test_fresh_start_takes_another_seed_and_the_time_left_then_gives_up(tmp_path):
    from cryocaps.training import TrainConfig
    from cryocaps.training.deadstart import MAX_RESTARTS, DeadNetwork, fresh_start

    config = TrainConfig(tomograms=[tmp_path], labels=[tmp_path], out_dir=tmp_path, seed=4,
                         max_minutes=12.0)  # fmt: skip
    restarts = []
    again = fresh_start(config, DeadNetwork(1), time.time() - 60, restarts)
    assert again.seed != 4 and again.max_minutes == pytest.approx(11.0, abs=0.05)
    assert restarts == [{"seed": 4, "epoch": 1}]
    for _ in range(MAX_RESTARTS - 1):
        again = fresh_start(again, DeadNetwork(2), time.time(), restarts)
    with pytest.raises(CryocapsError, match="every seed tried.*--lr"):
        fresh_start(again, DeadNetwork(1), time.time(), restarts)
    assert len({r["seed"] for r in restarts}) == MAX_RESTARTS + 1


def test_train_starts_again_when_the_network_ignores_its_input(tmp_path, dataset, monkeypatch):  # noqa: F811
    """The first check finds the network dead: training starts again from fresh weights with
    another seed, and the run folder holds only the second attempt's epochs."""
    from cryocaps.training import deadstart, train

    calls = []
    real = deadstart.ignores_its_input

    def dead_once(*args):
        calls.append(real(*args))
        return len(calls) == 1

    monkeypatch.setattr(deadstart, "ignores_its_input", dead_once)
    config = _config(dataset, tmp_path / "run", epochs=2, seed=3)
    result = train(config)
    assert result["dead_starts"] == [{"seed": 3, "epoch": 1}]
    assert result["seed_used"] != 3
    assert len(calls) == 3  # attempt 1: epoch 1; attempt 2: epochs 1 and 2
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "unet"
