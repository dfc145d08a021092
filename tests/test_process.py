"""Process-wide malloc policy: each call replaces the previous one, and it takes effect."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

# Allocate and free a 64 MB block 20 times; count the minor page faults that costs.
PROBE = """
import resource, sys
import numpy as np
from cryocaps import runtime as process
policy = sys.argv[1]
if policy != "default":
    assert getattr(process, policy)(), policy
np.ones(8 << 20)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = np.ones(8 << 20)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, process.current_policy())
"""


def faults(policy: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True, check=True)
    count, name = out.stdout.split()
    return int(count), name


def test_keep_freed_blocks_stops_page_faulting_reused_memory():
    kept, name = faults("keep_freed_blocks")
    returned, other = faults("return_freed_blocks")
    assert (name, other) == ("keep", "return")
    # memory handed back is faulted in again for every block (fewer faults with huge pages)
    assert returned > 20 * 100
    assert kept < returned / 20


def test_last_policy_wins():
    from cryocaps import runtime as process

    assert process.keep_freed_blocks()
    assert process.return_freed_blocks()
    assert process.current_policy() == "return"
