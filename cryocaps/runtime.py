"""Where the process runs: device, precision, threads, seeds, torchrun ranks, malloc policy.

The only module that decides any of these; commands and stages ask it. Nothing
here imports torch at module level (the CLI's ``--help`` stays fast).

Memory policy (glibc malloc on Linux). Training and segmentation want opposite
things from glibc's malloc:

- Training allocates the same large tensors every step (3D-UCaps vote tensors
  are 30-130 MB). By default glibc maps each block above its mmap threshold
  afresh and unmaps it when freed, so every step page-faults them in again;
  measured on the capsule layers, that doubles or triples the cost of an
  element-wise pass. :func:`keep_freed_blocks` serves everything from the heap
  and never trims it: peak memory is unchanged, but the process keeps it until
  it exits.
- Segmentation allocates per-window tensors of changing sizes; once glibc has
  raised its threshold they come from the heap and fragment it, so peak RSS
  creeps up with the number of windows (measured: +34 MB over six passes of 9
  windows, flat with the policy). :func:`return_freed_blocks` maps every block
  above a small fixed threshold, so freeing it returns the memory.

Each call replaces the previous policy (the last one wins), so tests and
notebooks that train and then segment in one process stay correct. Both are
no-ops returning False where ``mallopt`` is missing (macOS, musl, Windows), and
both are skipped on CUDA runs (:func:`tune_process_for`), where host malloc is
not the bottleneck.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass

from cryocaps.errors import CryocapsError

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024
GLIBC_DEFAULT_MMAP_MAX = 65536

_policy: str | None = None  # the policy applied last (None: glibc's defaults)


def _mallopt(settings: list[tuple[int, int]]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(bool(mallopt(parameter, value)) for parameter, value in settings)


def _apply(name: str, settings: list[tuple[int, int]]) -> bool:
    global _policy
    done = _mallopt(settings)
    if done:
        _policy = name
    return done


def keep_freed_blocks() -> bool:
    """Keep freed memory mapped for reuse (training); True if applied."""
    return _apply("keep", [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)])


def return_freed_blocks(threshold_bytes: int = 256 * 1024) -> bool:
    """Hand blocks above ``threshold_bytes`` back to the system when freed (segmentation); True
    if applied."""
    return _apply(
        "return",
        [
            (M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX),
            (M_TRIM_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD),
            (M_MMAP_THRESHOLD, int(threshold_bytes)),
        ],
    )


def current_policy() -> str | None:
    """``"keep"``, ``"return"`` or None (glibc's defaults), for run.json."""
    return _policy


# --------------------------------------------------------------------------- device


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; validates explicit names.

    Under torchrun a bare 'cuda' becomes 'cuda:LOCAL_RANK' (one GPU a process).
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CryocapsError(f"--device {name}: CUDA is not available on this machine")
    try:
        torch.device(name)
    except RuntimeError:
        raise CryocapsError(
            f"--device {name!r}: not a torch device (use auto, cpu, cuda, cuda:N)"
        ) from None
    info = distributed_info()
    if name == "cuda" and info.active:
        name = f"cuda:{info.local_rank}"
    return name


def device_type(device: str) -> str:
    """Type of a device name: "cpu", "cuda", …"""
    import torch

    return torch.device(device).type


# --------------------------------------------------------------------------- precision


def native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast
    pays."""
    try:
        import torch.cpu

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError, RuntimeError):
        return False


def use_bf16(device: str, requested: bool | None = None) -> bool:
    """bf16 autocast on CPU: as requested, else where the CPU computes bf16 natively."""
    if device_type(device) != "cpu":
        return False
    return native_bf16() if requested is None else bool(requested)


def autocast(device: str, bf16: bool = False):
    """The autocast context for a device: float16 on CUDA, bfloat16 on CPU when ``bf16``, else
    none."""
    import torch

    kind = device_type(device)
    if kind == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if kind == "cpu" and bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- threads and seeds


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def physical_memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def configure_threads(threads: int | None = None, processes_on_node: int = 1) -> int:
    """Use ``threads`` torch threads (None: this process's share of the CPUs); returns the
    number. Fewer than 1 is refused (0 does not mean "all" anywhere in cryocaps)."""
    import torch

    if threads is not None and threads < 1:
        raise CryocapsError(f"--threads {threads}: must be at least 1")
    wanted = threads or max(1, available_cpus() // max(1, processes_on_node))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and (when imported) torch's generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


# --------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class Distributed:
    """This process's place among torchrun's processes (one process: rank 0 of 1)."""

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


def distributed_info() -> Distributed:
    """Rank and world size from torchrun's environment, without joining a process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    return Distributed(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def setup_distributed(device: str) -> Distributed:
    """Join the process group torchrun set up (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    info = distributed_info()
    if not info.active:
        return info
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=info.local_rank,
        local_world_size=info.local_world_size,
    )


def tune_process_for(job: str, device: str) -> bool:
    """The malloc policy for ``job`` ("train" keeps freed blocks, "segment" returns them); CPU
    only."""
    if device_type(device) != "cpu":
        return False
    return keep_freed_blocks() if job == "train" else return_freed_blocks()
