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

Loading a library runs its code, so the cache trusts only what this user alone
could have put there. The folder (``$XDG_CACHE_HOME/cryocaps/native``, else
``~/.cache/cryocaps/native``) is created 0700; a library in it is loaded only
when that folder and its parent ``cryocaps`` belong to this user and nobody else
may write to them, the folders above them belong to this user or root and are
writable by nobody else (or sticky, as /tmp), and the file is a regular file of
this user that nobody else may write to. Otherwise the kernel is built in a
private temporary folder, loaded from there and the folder removed (one
warning). A library that does not load, lacks a routing symbol or carries
another ABI stamp than ``ABI`` is removed and built again once; if that fails
too, the layers route in PyTorch (one warning, no traceback). Builds go to a
temporary name in the same folder and are renamed into place, so processes
building at the same time never load a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import torch

__all__ = [
    "ABI", "available", "backward", "build_error", "forward", "library_name", "library_path",
    "status", "supports",
]  # fmt: skip

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_routing.c")
# The stamp cryocaps_routing_abi() returns: CRYOCAPS_ROUTING_ABI in _routing.c (bumped there
# and here together whenever an entry point's arguments or meaning change).
ABI = 2
CPUINFO = Path("/proc/cpuinfo")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Reassociation lets the compiler vectorize the sums and maxima over the output
# capsules (2x faster routing); nothing here relies on IEEE order of summation.
FLAGS = [
    "-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
    "-fno-trapping-math", "-ffinite-math-only", "-fPIC", "-shared", "-std=c99", "-pthread",
]  # fmt: skip
NATIVE_FLAG = "-march=native"
# /proc/cpuinfo fields that name a CPU type (x86: vendor_id ... model name; ARM: CPU
# implementer ... CPU part) and those that list its instruction-set extensions: what
# -march=native compiles for. Frequencies and per-core numbers are left out.
CPU_TYPE_FIELDS = (
    "vendor_id", "cpu family", "model", "model name",
    "CPU implementer", "CPU architecture", "CPU variant", "CPU part",
)  # fmt: skip
CPU_FEATURE_FIELDS = ("flags", "Features")
_int64, _pointer = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = {
    "cryocaps_route": [_pointer, ctypes.c_int] + [_int64] * 8
    + [_pointer, ctypes.c_int, _pointer, _pointer, ctypes.c_int],
    "cryocaps_route_backward": [_pointer, ctypes.c_int] + [_int64] * 8
    + [_pointer, _pointer, ctypes.c_int],
}  # fmt: skip
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
# ELF header, by class (32/64-bit): the offsets of the program and section header tables
# (format, position), where their entry sizes and counts start, and a program header's
# type, offset in the file and size in the file (format).
_ELF_LAYOUT = {32: ("II", 0x1C, 0x2A, "II8xI"), 64: ("QQ", 0x20, 0x36, "I4xQ16xQ")}
_build_error: str | None = None


class _NotTheKernel(Exception):
    """A library at the kernel's path that is not this version of the kernel."""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _cpu_signature(cpuinfo: Path | None = None) -> str | None:
    """The CPU type and features ``-march=native`` compiles for, from ``cpuinfo`` (default
    ``CPUINFO``), or None where it names no CPU type or no features (then no native build)."""
    try:
        lines = Path(CPUINFO if cpuinfo is None else cpuinfo).read_text().splitlines()
    except OSError:
        return None
    fields = set()
    for line in lines:
        name, colon, value = line.partition(":")
        name = name.strip()
        if colon and name in CPU_TYPE_FIELDS + CPU_FEATURE_FIELDS:
            fields.add(f"{name}: {' '.join(value.split())}")
    names = {field.partition(":")[0] for field in fields}
    if names.isdisjoint(CPU_TYPE_FIELDS) or names.isdisjoint(CPU_FEATURE_FIELDS):
        return None
    return "\n".join(sorted(fields))  # one line per distinct value (big.LITTLE: both cores)


def _flags(cpuinfo: Path | None = None) -> list[str]:
    """Compiler flags: for this CPU type where ``cpuinfo`` identifies it, else portable."""
    return [*FLAGS, NATIVE_FLAG] if _cpu_signature(cpuinfo) is not None else list(FLAGS)


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def library_name(compiler: str, cpuinfo: Path | None = None) -> str:
    """The file name of the library built from this source by ``compiler`` for this CPU:
    a hash of the source, the compiler and its version, the flags, the machine and the CPU
    type (``cpuinfo``, default ``CPUINFO``), so no two CPU types share a native build."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    signature = _cpu_signature(cpuinfo) or "portable"
    parts = [
        SOURCE.read_text(), compiler, version, " ".join(_flags(cpuinfo)),
        platform.machine(), signature,
    ]  # fmt: skip
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return f"routing-{key}{'.dll' if os.name == 'nt' else '.so'}"


def library_path(compiler: str, cpuinfo: Path | None = None) -> Path:
    """Where the library built from this source by ``compiler`` for this CPU is cached."""
    return _cache_root() / "cryocaps" / "native" / library_name(compiler, cpuinfo)


# ---------------------------------------------------------------- what the cache may trust


def _not_ours_alone(path: Path, folder: bool) -> str | None:
    """Why ``path`` (not followed if a link) is not a folder/regular file of this user that
    nobody else may write to, or None."""
    info = os.lstat(path)
    kind = "folder" if folder else "regular file"
    if not (stat.S_ISDIR if folder else stat.S_ISREG)(info.st_mode):
        return f"{path} is not a {kind}"
    if info.st_uid != os.getuid():
        return f"{path} belongs to user id {info.st_uid}, not to this user ({os.getuid()})"
    if info.st_mode & _WRITABLE_BY_OTHERS:
        return f"{path} may be written by others (mode {stat.filemode(info.st_mode)})"
    return None


def _replaceable_by_others(folder: Path) -> str | None:
    """Why someone else could put another folder in place of ``folder`` (resolved): a folder
    above it that belongs to another user than this one or root, or that others may write to
    without the sticky bit. None if nobody can."""
    for ancestor in folder.parents:
        info = os.stat(ancestor)
        if info.st_uid not in (0, os.getuid()):
            return f"{ancestor} belongs to user id {info.st_uid}"
        if info.st_mode & _WRITABLE_BY_OTHERS and not info.st_mode & stat.S_ISVTX:
            return f"{ancestor} may be written by others (mode {stat.filemode(info.st_mode)})"
    return None


def _private_cache_folder() -> tuple[Path | None, str | None]:
    """The cache folder, its missing levels created 0700: (folder, None) if it can be
    trusted, else (None, why not)."""
    if not hasattr(os, "getuid"):
        return None, "file owners cannot be checked on this system"
    try:
        root = _cache_root()
        os.makedirs(root, mode=0o700, exist_ok=True)
        ours = Path(os.path.realpath(root)) / "cryocaps"
        reason = _replaceable_by_others(ours)
        for folder in (ours, ours / "native"):
            if reason is not None:
                return None, reason
            try:
                os.mkdir(folder, 0o700)
                os.chmod(folder, 0o700)  # exactly 0700, whatever the umask
            except FileExistsError:
                pass
            reason = _not_ours_alone(folder, folder=True)
    except OSError as error:
        return None, f"{type(error).__name__}: {error}"
    return (None, reason) if reason is not None else (ours / "native", None)


# ---------------------------------------------------------------- building and loading


def _compile(compiler: str, flags: list[str], output: str) -> None:
    """Run the compiler on ``SOURCE``; OSError with its last message line if it fails."""
    result = subprocess.run(
        [compiler, *flags, str(SOURCE), "-o", output, "-lm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if result.returncode != 0:
        raise OSError(result.stderr.strip().splitlines()[-1] if result.stderr else "failed")


def _remove_abandoned_builds(folder: Path) -> None:
    """Remove temporary files of builds killed before they finished (older than an hour;
    a build times out after five minutes)."""
    for temporary in folder.glob(".routing-*.tmp"):
        try:
            if time.time() - temporary.lstat().st_mtime > 3600:
                temporary.unlink()
        except OSError:
            pass  # another process removed it first


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file in the target's folder, make it 0700 and rename it into
    place: a process building or loading at the same time sees the old file or the whole new
    one, never a part."""
    _remove_abandoned_builds(target.parent)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".routing-", suffix=".tmp")
    os.close(handle)
    try:
        _compile(compiler, flags, temporary)
        os.chmod(temporary, 0o700)  # the linker creates its output with the umask's mode
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _unload(library: ctypes.CDLL) -> None:
    """Close a library that is not the kernel, so that loading the rebuilt file at the same
    path loads the new file (the loader reuses a library still open under that name)."""
    import _ctypes

    close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    try:
        close(library._handle)
    except (OSError, TypeError):
        pass


def _shorter_than_its_headers(path: Path) -> str | None:
    """Why the ELF file ``path`` is cut short, or None (also for any file that is not ELF:
    the loader refuses those itself). The loader maps a cut file's segments past its end and
    the process dies of SIGBUS, so this is checked before loading, not left to the loader."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        return None
    if len(data) < 64:  # the longest ELF header
        return f"{path} is cut short ({len(data)} bytes)"
    tables, tables_at, sizes_at, segment = _ELF_LAYOUT[64 if data[4] == 2 else 32]
    order = "<" if data[5] == 1 else ">"
    program_at, section_at = struct.unpack_from(order + tables, data, tables_at)
    program_size, programs, section_size, sections = struct.unpack_from(
        order + "HHHH", data, sizes_at
    )
    ends = [program_at + program_size * programs, section_at + section_size * sections]
    for k in range(programs if ends[0] <= len(data) else 0):
        kind, offset, size = struct.unpack_from(
            order + segment, data, program_at + k * program_size
        )
        if kind == 1:  # PT_LOAD: mapped from the file
            ends.append(offset + size)
    if max(ends) > len(data):
        return f"{path} is cut short ({len(data)} bytes, its headers say {max(ends)})"
    return None


def _load(path: Path) -> ctypes.CDLL:
    """Load the kernel and declare its entry points; OSError if the file does not load,
    AttributeError if a symbol is missing, _NotTheKernel if it is cut short or its ABI stamp
    is not ``ABI``."""
    short = _shorter_than_its_headers(path)
    if short is not None:
        raise _NotTheKernel(short)
    library = ctypes.CDLL(str(path))
    try:
        stamp = library.cryocaps_routing_abi
        stamp.argtypes, stamp.restype = [], ctypes.c_int
        found = stamp()
        if found != ABI:
            raise _NotTheKernel(f"{path} has ABI stamp {found}, not {ABI}")
        for name, argtypes in _ARGTYPES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
    except (AttributeError, _NotTheKernel):
        _unload(library)
        raise
    return library


def _load_or_build(
    compiler: str, flags: list[str], target: Path, problems: list[str]
) -> ctypes.CDLL | None:
    """The kernel from the (trusted) cache folder: loaded if there, else built and loaded.
    A file that is not this user's alone, does not load or is not the kernel is removed and
    built again, once. What went wrong goes to ``problems``; None if the rebuild fails too."""
    for attempt in ("cached", "rebuilt"):
        if not os.path.lexists(target):
            _build(compiler, flags, target)
        try:
            untrusted = _not_ours_alone(target, folder=False)
            if untrusted is not None:
                raise _NotTheKernel(untrusted)
            return _load(target)
        except (OSError, AttributeError, _NotTheKernel) as error:
            again = ", built it again" if attempt == "cached" else ""
            problems.append(f"{error} (removed it{again})")
            target.unlink(missing_ok=True)
    return None


def _build_privately(
    compiler: str, flags: list[str], name: str, problems: list[str]
) -> ctypes.CDLL | None:
    """The kernel built in a new private temporary folder and loaded; the folder is removed
    (a loaded library stays mapped). What went wrong goes to ``problems``."""
    folder = tempfile.mkdtemp(prefix="cryocaps-routing-")  # 0700, a name nobody can guess
    try:
        target = Path(folder) / name
        _build(compiler, flags, target)
        try:
            return _load(target)
        except (OSError, AttributeError, _NotTheKernel) as error:
            problems.append(str(error))
            return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with the reason in ``build_error()``). What went wrong is
    logged in one line: a warning where the cache or a file in it was not trusted or not
    the kernel, info where there is merely no kernel (no compiler, switched off, no build)."""
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
    problems: list[str] = []
    library = build_failure = None
    outcome = "using the kernel built again"
    try:
        flags, name = _flags(), library_name(compiler)
        folder, distrust = _private_cache_folder()
        if folder is not None:
            library = _load_or_build(compiler, flags, folder / name, problems)
        else:
            problems.append(f"the kernel cache is not private: {distrust}")
            outcome = "using a kernel built in a private temporary folder for this process"
            library = _build_privately(compiler, flags, name, problems)
    except (OSError, subprocess.SubprocessError) as error:
        build_failure = f"the build failed: {type(error).__name__}: {error}"
    if library is None:
        _build_error = build_failure or problems[-1]
        outcome = "routing in PyTorch"
    if problems:
        said = [*problems, build_failure] if build_failure else problems
        log.warning("C routing kernel: %s; %s", "; ".join(said), outcome)
    elif build_failure:
        log.info("C routing kernel: %s; %s", build_failure, outcome)
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


def _check(status: int) -> None:
    """The kernel returns 0, or -1 where a worker could not allocate its few kB of buffers.
    Raised as MemoryError rather than routed in PyTorch: that would need far more memory."""
    if status != 0:
        raise MemoryError("the C routing kernel could not allocate its per-thread buffers")


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
    _check(status)
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
    status = _library().cryocaps_route_backward(
        grad_votes.data_ptr(), DTYPES[dtype], batch, n_in, n_voxels, n_atoms, n_out,
        strides[0], strides[1], strides[2],
        None if coupling is None else coupling.data_ptr(), grad_s.data_ptr(), _threads(),
    )  # fmt: skip
    _check(status)
    return grad_votes
