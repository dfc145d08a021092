"""Process-wide malloc policy: which mallopt settings each policy applies, and when it is skipped.

These tests check what cryocaps asks of glibc, not what the kernel then does:
page-fault counts depend on the machine (huge pages, other processes), so
they are not asserted here.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from cryocaps import runtime

REAL_CDLL = runtime.ctypes.CDLL


class FakeLibc:
    """Stands in for ``ctypes.CDLL(None)``: records mallopt calls, answers ``result``."""

    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.result = result

        def mallopt(parameter: int, value: int) -> int:  # a function: runtime sets .argtypes on it
            self.calls.append((parameter, value))
            return self.result

        self.mallopt = mallopt

    def __call__(self, name, *args, **kwargs):
        # CDLL(None) is the process's C library; other libraries (torch loads some) stay real
        return self if name is None else REAL_CDLL(name, *args, **kwargs)


@pytest.fixture
def libc(monkeypatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.ctypes, "CDLL", fake)
    monkeypatch.setattr(runtime, "_policy", None)
    return fake


def test_keep_freed_blocks_stops_mmap_and_trimming(libc):
    assert runtime.keep_freed_blocks() is True
    assert libc.calls == [(runtime.M_MMAP_MAX, 0), (runtime.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert runtime.current_policy() == "keep"


def test_return_freed_blocks_restores_glibc_defaults_with_a_fixed_threshold(libc):
    assert runtime.return_freed_blocks(threshold_bytes=512 * 1024) is True
    assert libc.calls == [
        (runtime.M_MMAP_MAX, runtime.GLIBC_DEFAULT_MMAP_MAX),
        (runtime.M_TRIM_THRESHOLD, runtime.GLIBC_DEFAULT_TRIM_THRESHOLD),
        (runtime.M_MMAP_THRESHOLD, 512 * 1024),
    ]
    assert runtime.current_policy() == "return"


def test_last_policy_wins(libc):
    assert runtime.keep_freed_blocks()
    assert runtime.return_freed_blocks()
    assert runtime.current_policy() == "return"
    assert runtime.keep_freed_blocks()
    assert runtime.current_policy() == "keep"


def test_refused_mallopt_is_not_recorded(libc):
    libc.result = 0  # glibc returns 0 when it rejects a setting
    assert runtime.keep_freed_blocks() is False
    assert runtime.current_policy() is None


def test_skipped_without_glibc(libc, monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.keep_freed_blocks() is False
    assert runtime.return_freed_blocks() is False
    assert libc.calls == []
    assert runtime.current_policy() is None


@pytest.mark.parametrize(("job", "policy"), [("train", "keep"), ("segment", "return")])
def test_tune_process_for_cpu_jobs(libc, job, policy):
    assert runtime.tune_process_for(job, "cpu") is True
    assert runtime.current_policy() == policy


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_tune_process_for_skips_cuda(libc, device):
    # torch.device("cuda") needs no GPU: the skip is decided from the name alone
    assert runtime.tune_process_for("train", device) is False
    assert runtime.tune_process_for("segment", device) is False
    assert libc.calls == []
    assert runtime.current_policy() is None


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc mallopt")
def test_real_glibc_accepts_both_policies():
    # In a child process: the settings change this process's allocator for good.
    code = (
        "from cryocaps import runtime\n"
        "print(runtime.keep_freed_blocks(), runtime.current_policy(),"
        " runtime.return_freed_blocks(), runtime.current_policy())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "keep", "True", "return"]
