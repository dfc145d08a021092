"""The routing kernel in C (``_routing.c``), built on first use by the system C compiler.

Dynamic routing is memory-bound in PyTorch: every iteration is several passes
over the vote tensor. ``_routing.c`` reads each voxel's votes once and runs all
iterations on them in cache. It has no Python or torch headers, so building it
needs only a C compiler (``cc``, or ``$CC``): the shared library is compiled for
this CPU (``-march=native``) into a cache folder, keyed by the source, the
compiler and the CPU, and loaded with ``ctypes``. Where there is no compiler,
the build fails or ``CRYOCAPS_NATIVE_ROUTING=0`` is set, ``available()`` is
False and the capsule layers route in PyTorch (same values within float32
rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = [
    "available", "backward", "build_error", "forward", "library_path", "status", "supports",
]  # fmt: skip

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_routing.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Reassociation lets the compiler vectorize the sums and maxima over the output
# capsules (2x faster routing); nothing here relies on IEEE order of summation.
FLAGS = [
    "-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
    "-fno-trapping-math", "-ffinite-math-only", "-fPIC", "-shared", "-std=c99", "-pthread",
]  # fmt: skip
_int64, _pointer = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = {
    "cryocaps_route": [_pointer, ctypes.c_int] + [_int64] * 8
    + [_pointer, ctypes.c_int, _pointer, _pointer, ctypes.c_int],
    "cryocaps_route_backward": [_pointer, ctypes.c_int] + [_int64] * 8
    + [_pointer, _pointer, ctypes.c_int],
}  # fmt: skip
_build_error: str | None = None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep))) or platform.machine()


def _cache_folder() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "cryocaps" / "native"


def library_path(compiler: str) -> Path:
    """Where the library built from this source by ``compiler`` for this CPU is cached."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    parts = [SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_signature()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return _cache_folder() / f"routing-{key}{'.dll' if os.name == 'nt' else '.so'}"


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file and move it into place (safe for parallel ranks)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary, "-lm"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            raise OSError(result.stderr.strip().splitlines()[-1] if result.stderr else "failed")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with the reason in ``build_error()``)."""
    global _build_error
    _build_error = None
    switch = os.environ.get("CRYOCAPS_NATIVE_ROUTING", "1").strip().lower()
    if switch in {"0", "false", "no", "off"}:
        _build_error = "switched off by CRYOCAPS_NATIVE_ROUTING"
        return None
    compiler = _compiler()
    if compiler is None:
        _build_error = "no C compiler (cc, gcc or $CC) on PATH"
        return None
    try:
        target = library_path(compiler)
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
        for name, argtypes in _ARGTYPES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
    except (OSError, subprocess.SubprocessError) as error:
        _build_error = f"{type(error).__name__}: {error}"
        log.info("routing in PyTorch: the C routing kernel did not build (%s)", _build_error)
        return None
    return library


def available() -> bool:
    """Whether the C routing kernel is built and loaded (building it on first call)."""
    return _library() is not None


def build_error() -> str | None:
    """Why the kernel is not available, or None."""
    _library()
    return _build_error


def supports(votes: torch.Tensor) -> bool:
    """Whether the kernel is built and ``forward``/``backward`` take these votes (B, I, P,
    A, O): CPU, float32 or bfloat16, each voxel's (A, O) block contiguous."""
    if votes.device.type != "cpu" or votes.dtype not in DTYPES or votes.dim() != 5:
        return False
    n_out = votes.shape[-1]
    layout = votes.stride(-1) == 1 and (votes.shape[-2] == 1 or votes.stride(-2) == n_out)
    return layout and available()


def status() -> str | None:
    """How capsule layers route on the CPU in this process ("C kernel" or "PyTorch (why)"),
    or None if nothing has asked for the kernel yet (no build is started to find out)."""
    if _library.cache_info().currsize == 0:
        return None
    return "C kernel" if _library() is not None else f"PyTorch ({_build_error})"


def _threads() -> int:
    return max(1, torch.get_num_threads())


def forward(
    votes: torch.Tensor, bias: torch.Tensor | None, iterations: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All routing iterations on votes (B, I, P, A, O) (``supports(votes)``).

    Returns the pre-squash sums of the last iteration (B, P, A, O) and its
    coupling (B, I, P, O), float32, or None for the coupling after one iteration.
    """
    batch, n_in, n_voxels, n_atoms, n_out = votes.shape
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    pre_squash = torch.empty((batch, n_voxels, n_atoms, n_out), dtype=torch.float32, device="cpu")
    coupling = None
    if iterations > 1:
        coupling = torch.empty((batch, n_in, n_voxels, n_out), dtype=torch.float32, device="cpu")
    status = _library().cryocaps_route(
        votes.data_ptr(), DTYPES[votes.dtype], batch, n_in, n_voxels, n_atoms, n_out,
        votes.stride(0), votes.stride(1), votes.stride(2),
        None if bias32 is None else bias32.data_ptr(), int(iterations),
        pre_squash.data_ptr(), None if coupling is None else coupling.data_ptr(), _threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the C routing kernel could not allocate its per-thread buffers")
    return pre_squash, coupling


def backward(coupling: torch.Tensor | None, grad_s: torch.Tensor, vote_meta: tuple) -> torch.Tensor:
    """dL/du = c ⊗ dL/ds in the votes' dtype and memory layout (``vote_meta``).

    ``coupling`` (B, I, P, O) float32 or None (uniform 1/O), ``grad_s`` (B, P, A, O).
    """
    dtype, shape, strides = vote_meta
    grad_votes = torch.empty_strided(shape, strides, dtype=dtype, device="cpu")
    grad_s = grad_s.to(torch.float32).contiguous()
    coupling = None if coupling is None else coupling.to(torch.float32).contiguous()
    batch, n_in, n_voxels, n_atoms, n_out = shape
    _library().cryocaps_route_backward(
        grad_votes.data_ptr(), DTYPES[dtype], batch, n_in, n_voxels, n_atoms, n_out,
        strides[0], strides[1], strides[2],
        None if coupling is None else coupling.data_ptr(), grad_s.data_ptr(), _threads(),
    )  # fmt: skip
    return grad_votes
