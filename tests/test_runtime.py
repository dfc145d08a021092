"""cryocaps.runtime: the one place that decides device, precision, threads, seeds and ranks."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from cryocaps import runtime
from cryocaps.errors import CryocapsError


def test_autocast_is_float16_on_cuda_bfloat16_on_cpu_when_asked():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... disabling autocast" here
        on_cuda = runtime.autocast("cuda:0", bf16=True)  # bf16 is a CPU choice; CUDA uses fp16
    assert isinstance(on_cuda, torch.autocast)
    assert on_cuda.fast_dtype == torch.float16 and on_cuda.device == "cuda"
    on_cpu = runtime.autocast("cpu", bf16=True)
    assert isinstance(on_cpu, torch.autocast) and on_cpu.fast_dtype == torch.bfloat16
    assert not isinstance(runtime.autocast("cpu", bf16=False), torch.autocast)


def test_bf16_is_a_cpu_decision():
    assert runtime.use_bf16("cuda", requested=True) is False
    assert runtime.use_bf16("cpu", requested=True) is True
    assert runtime.use_bf16("cpu", requested=False) is False
    assert runtime.use_bf16("cpu") is runtime.native_bf16()


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == "cpu"
    with pytest.raises(CryocapsError, match="--device cuda: CUDA is not available"):
        runtime.resolve_device("cuda")
    with pytest.raises(CryocapsError, match="not a torch device"):
        runtime.resolve_device("gpu7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == "cuda"
    # under torchrun a bare "cuda" is this process's GPU
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.resolve_device("cuda") == "cuda:1"
    assert runtime.resolve_device("cuda:0") == "cuda:0"


def test_distributed_info_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = runtime.distributed_info()
    assert (single.rank, single.world_size, single.is_main, single.active) == (0, 1, True, False)
    for name, value in {
        "WORLD_SIZE": "4",
        "RANK": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
    }.items():
        monkeypatch.setenv(name, value)
    info = runtime.distributed_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (2, 4, 0, 2)
    assert info.active and not info.is_main


def test_threads_share_the_cpus_between_processes_on_a_node():
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1) == 1 and torch.get_num_threads() == 1
        share = runtime.configure_threads(None, processes_on_node=runtime.available_cpus() * 4)
        assert share == 1  # never zero threads
        assert runtime.configure_threads(None) == runtime.available_cpus()
    finally:
        torch.set_num_threads(before)


def test_seed_everything_makes_every_generator_repeat():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    runtime.seed_everything(123)
    first = draw()
    runtime.seed_everything(123)
    assert draw() == first
    runtime.seed_everything(124)
    assert draw() != first
