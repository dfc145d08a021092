"""The C routing kernel's cache (models.native): it loads only what this user alone could have
put there, rejects what is not the kernel, builds atomically, keys builds by CPU type.

One real build per session (``built_kernel``); the tests that need a rebuild get a
"compiler" that copies that build (``copying_compiler``), except the two processes
that build at once, which run the real compiler.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cryocaps.models import create_model, native, routing
from cryocaps.models.capsules import ConvCapsule3d

REPO = Path(__file__).resolve().parents[1]

# A library somebody else planted: its constructor leaves a marker file, so a test sees
# whether it was ever loaded. With STAMP defined it has the kernel's symbols and that stamp.
PLANTED_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("CRYOCAPS_TEST_MARKER");
    FILE *file = marker ? fopen(marker, "w") : NULL;
    if (file) { fputs("loaded", file); fclose(file); }
}
#ifdef STAMP
int cryocaps_routing_abi(void) { return STAMP; }
int cryocaps_route(void) { return 0; }
int cryocaps_route_backward(void) { return 0; }
#endif
"""


@pytest.fixture(scope="session")
def compiler() -> str:
    found = native._compiler()
    if found is None:
        pytest.skip("no C compiler")
    return found


@pytest.fixture(scope="session")
def built_kernel(compiler, tmp_path_factory) -> Path:
    """The kernel, built once for the session in its own cache folder."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        native._library.cache_clear()
        try:
            assert native.available(), native.build_error()
            return native.library_path(compiler)
        finally:
            native._library.cache_clear()


@pytest.fixture(scope="session")
def planted(compiler, tmp_path_factory) -> dict[str, Path]:
    """Libraries with a marker-writing constructor: no kernel symbols, the kernel's symbols
    with another ABI stamp, and the kernel's symbols with the right stamp."""
    folder = tmp_path_factory.mktemp("planted")
    source = folder / "planted.c"
    source.write_text(PLANTED_SOURCE)
    variants = {"no symbols": [], "wrong stamp": [f"-DSTAMP={native.ABI + 1}"]}
    variants["right stamp"] = [f"-DSTAMP={native.ABI}"]
    libraries = {}
    for name, defines in variants.items():
        library = folder / f"{name.replace(' ', '-')}.so"
        subprocess.run(
            [compiler, "-shared", "-fPIC", *defines, str(source), "-o", str(library)], check=True
        )
        libraries[name] = library
    return libraries


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache root (XDG_CACHE_HOME) for this test; the kernel is looked up afresh."""
    root = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    monkeypatch.setenv("CRYOCAPS_TEST_MARKER", str(tmp_path / "planted-library-ran"))
    native._library.cache_clear()
    yield root
    native._library.cache_clear()


@pytest.fixture
def copying_compiler(built_kernel, monkeypatch) -> list[str]:
    """Builds copy the session's build (fast); returns the outputs it was asked for."""
    outputs = []

    def copy(compiler, flags, output):
        outputs.append(output)
        Path(output).write_bytes(built_kernel.read_bytes())

    monkeypatch.setattr(native, "_compile", copy)
    return outputs


@pytest.fixture
def messages() -> list[logging.LogRecord]:
    """The native module's log records (its own handler: the CLI may stop propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger(native.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _kernel_folder(cache: Path, mode: int = 0o700) -> Path:
    folder = cache / "cryocaps" / "native"
    folder.mkdir(parents=True)
    for level in (folder.parent, folder):
        level.chmod(mode)
    return folder


def _warnings(records) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def _routes_like_pytorch() -> None:
    votes = torch.randn(2, 3, 37, 6, 8)
    pre_squash, coupling = native.forward(votes, None, 3)
    expected_s, expected_c = routing._route_blocks(votes, None, 3, None, 10)
    torch.testing.assert_close(pre_squash, expected_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coupling, expected_c, rtol=1e-5, atol=1e-6)


def test_the_abi_stamp_is_the_sources():
    found = re.search(r"#define CRYOCAPS_ROUTING_ABI (\d+)", native.SOURCE.read_text())
    assert found and int(found.group(1)) == native.ABI


def test_cache_folders_and_library_are_private_whatever_the_umask(
    cache, copying_compiler, messages, compiler
):
    before = os.umask(0)  # the least private umask
    try:
        assert native.available(), native.build_error()
    finally:
        os.umask(before)
    library = native.library_path(compiler)
    for path in (cache / "cryocaps", library.parent, library):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert sorted(library.parent.iterdir()) == [library]  # no temporary file left
    assert len(copying_compiler) == 1 and _warnings(messages) == []
    _routes_like_pytorch()


def test_a_build_removes_what_killed_builds_left(cache, copying_compiler):
    folder = _kernel_folder(cache)
    abandoned, running = folder / ".routing-abandoned.tmp", folder / ".routing-running.tmp"
    for path in (abandoned, running):
        path.write_bytes(b"half a library")
    os.utime(abandoned, (0, 0))
    assert native.available(), native.build_error()
    assert not abandoned.exists() and running.exists()  # another process may still build


@pytest.mark.parametrize(
    "danger", ["group-writable folder", "other owner", "group-writable parent", "writable file"]
)
def test_a_library_others_could_have_planted_is_never_loaded(
    danger, cache, copying_compiler, built_kernel, planted, messages, compiler, monkeypatch
):
    folder = _kernel_folder(cache, 0o770 if danger == "group-writable folder" else 0o700)
    target = native.library_path(compiler)
    target.write_bytes(planted["right stamp"].read_bytes())  # the attacker's best library
    target.chmod(0o777 if danger == "writable file" else 0o700)
    if danger == "other owner":
        monkeypatch.setattr(os, "getuid", lambda: os.stat(folder).st_uid + 4242)
    if danger == "group-writable parent":
        cache.chmod(0o775)
    assert native.available(), native.build_error()
    assert not Path(os.environ["CRYOCAPS_TEST_MARKER"]).exists()  # its constructor never ran
    _routes_like_pytorch()
    (warning,) = _warnings(messages)
    assert str(cache) in warning
    if danger == "writable file":  # in a private folder: replaced by a build of our own
        assert target.read_bytes() == built_kernel.read_bytes()
        assert stat.S_IMODE(target.stat().st_mode) == 0o700
    else:  # built in a private temporary folder; nothing in the untrusted one touched
        assert "private temporary folder" in warning
        assert target.read_bytes() == planted["right stamp"].read_bytes()
        assert sorted(folder.iterdir()) == [target]
        assert not Path(copying_compiler[0]).parent.exists()  # the temporary folder is gone


@pytest.mark.parametrize("found", ["no symbols", "wrong stamp", "cut at 4 kB", "one byte short"])
def test_what_is_not_the_kernel_is_removed_and_built_again(
    found, cache, copying_compiler, built_kernel, planted, messages, compiler
):
    _kernel_folder(cache)
    target = native.library_path(compiler)
    if found.startswith(("cut", "one")):  # a disk that filled up, a copy that was cut short
        complete = built_kernel.read_bytes()
        target.write_bytes(complete[:4096] if found == "cut at 4 kB" else complete[:-1])
    else:
        target.write_bytes(planted[found].read_bytes())
    target.chmod(0o700)
    assert native.available(), native.build_error()
    _routes_like_pytorch()
    assert target.read_bytes() == built_kernel.read_bytes() and len(copying_compiler) == 1
    (warning,) = _warnings(messages)
    assert str(target) in warning and "built it again" in warning
    native._library.cache_clear()  # the next process loads the rebuilt file without a build
    assert native.available() and len(copying_compiler) == 1


def test_a_rebuild_that_is_not_the_kernel_either_routes_in_pytorch(
    cache, built_kernel, messages, compiler, monkeypatch
):
    def truncating(compiler, flags, output):
        Path(output).write_bytes(built_kernel.read_bytes()[:4096])

    monkeypatch.setattr(native, "_compile", truncating)
    assert not native.available()
    assert native.status().startswith("PyTorch (") and str(cache) in native.build_error()
    (warning,) = _warnings(messages)  # one line for both attempts
    assert warning.count("removed it") == 2 and warning.endswith("routing in PyTorch")
    assert not native.library_path(compiler).exists()  # the next run tries again
    layer = ConvCapsule3d(2, 4, 3, 4)
    assert layer(torch.randn(1, 2, 4, 4, 4, 4)).shape == (1, 3, 4, 4, 4, 4)


def test_a_compiler_that_fails_routes_in_pytorch_without_a_warning(cache, messages, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: "false")
    assert not native.available() and "the build failed" in native.build_error()
    assert _warnings(messages) == [] and len(messages) == 1
    folder = cache / "cryocaps" / "native"
    assert list(folder.iterdir()) == []  # the failed build left no temporary file


TWO_BUILDERS = """
import os, sys, torch
from cryocaps.models import native, routing
os.umask(0)
print("ready", flush=True)
sys.stdin.readline()  # both processes have imported torch: build at the same moment
assert native.available(), native.build_error()
torch.manual_seed(int(sys.argv[1]))
votes = torch.randn(2, 3, 37, 6, 8)
pre_squash, coupling = native.forward(votes, None, 3)
expected_s, expected_c = routing._route_blocks(votes, None, 3, None, 10)
torch.testing.assert_close(pre_squash, expected_s, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(coupling, expected_c, rtol=1e-5, atol=1e-6)
print(native.status(), native.library_path(native._compiler()), flush=True)
"""


def test_two_processes_building_at_once_both_route_with_the_kernel(compiler, tmp_path):
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_BUILDERS, str(seed)],
            env=environment,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for seed in (0, 1)
    ]
    for process in processes:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    results = [process.communicate(timeout=300) for process in processes]
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err
        assert out.startswith("C kernel "), out + err
    folder = tmp_path / "cryocaps" / "native"
    (library,) = folder.iterdir()  # one library, no temporary file
    assert {out.split()[-1] for out, _ in results} == {str(library)}
    for path in (folder.parent, folder, library):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


ARM = """processor\t: {core}
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: {variant}
CPU part\t: {part}
CPU revision\t: 1
"""


def _cpuinfo(folder: Path, name: str, *cores: str) -> Path:
    path = folder / name
    path.write_text("\n".join(cores))
    return path


def test_each_cpu_type_gets_its_own_build(compiler, tmp_path):
    neoverse_n1 = [ARM.format(core=k, variant="0x3", part="0xd0c") for k in range(2)]
    neoverse_v1 = [ARM.format(core=k, variant="0x1", part="0xd40") for k in range(2)]
    big_little = [neoverse_n1[0], ARM.format(core=1, variant="0x1", part="0xd40")]
    x86 = "processor\t: {}\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\ncpu MHz\t: {}\n"
    x86 += "flags\t\t: fpu sse sse2 avx2 avx512f\n"
    cpus = {
        "n1": _cpuinfo(tmp_path, "n1", *neoverse_n1),
        "v1": _cpuinfo(tmp_path, "v1", *neoverse_v1),
        "big.LITTLE": _cpuinfo(tmp_path, "bl", *big_little),
        "x86": _cpuinfo(tmp_path, "x86", x86.format(0, 2596.1), x86.format(1, 2596.1)),
        "x86 later": _cpuinfo(tmp_path, "x86b", x86.format(0, 3001.7), x86.format(1, 1500.0)),
        "nameless": _cpuinfo(tmp_path, "anon", "processor\t: 0\nBogoMIPS\t: 50.00\n"),
        "unreadable": tmp_path / "missing",
    }
    names = {cpu: native.library_name(compiler, path) for cpu, path in cpus.items()}
    assert names["x86"] == names["x86 later"]  # clock speeds are not the CPU type
    del names["x86 later"], names["unreadable"]
    assert len(set(names.values())) == len(names)
    for cpu in ("n1", "v1", "big.LITTLE", "x86"):
        assert native.NATIVE_FLAG in native._flags(cpus[cpu]), cpu
    for cpu in ("nameless", "unreadable"):  # a portable build, never one for another CPU
        assert native.NATIVE_FLAG not in native._flags(cpus[cpu]), cpu
    assert native.library_name(compiler, cpus["unreadable"]) == names["nameless"]


def test_the_kernel_out_of_memory_raises_memory_error(built_kernel, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(built_kernel.parents[2]))
    native._library.cache_clear()
    try:
        # 2^50 input capsules: the per-thread buffer (4 PiB) cannot be allocated; no voxels,
        # so no memory is touched. The C side returns -1; Python raises, never routes wrong.
        votes = torch.empty(1, 2**50, 0, 1, 1)
        with pytest.raises(MemoryError, match="could not allocate"):
            native.forward(votes, None, 3)
    finally:
        native._library.cache_clear()


def test_ucaps_routes_with_the_kernel_when_the_cache_is_fine(built_kernel, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(built_kernel.parents[2]))
    native._library.cache_clear()
    calls = {"forward": 0, "backward": 0}

    def counted(name):
        function = getattr(native, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(native, name, counted(name))
    try:
        model = create_model("ucaps", 3).train()
        output = model(torch.randn(1, 1, 16, 16, 16))
        logits = output[0] if isinstance(output, tuple) else output
        logits.float().square().mean().backward()
        assert native.status() == "C kernel"
        # every capsule layer that routes (three iterations) ran in C, both ways
        routed = sum(
            1
            for layer in model.modules()
            if isinstance(layer, ConvCapsule3d) and layer.routing_iterations > 1
        )
        assert routed > 0 and calls == {"forward": routed, "backward": routed}
    finally:
        native._library.cache_clear()
