"""reuse_freed_memory: glibc stops faulting big CPU tensors in afresh inside the block, and only there."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# Page faults over 10 of 30 allocations of 100 MB each, in turn, before and inside the block; after it, over
# 3 of 4 of 1.2 GB, more than the block left free in the heap, so only an mmap can serve them.
PROBE = """
import json, resource, torch
from e4srec.device import reuse_freed_memory
torch.set_num_threads(1)
def faults(size=25_000_000, warm=20, counted=10):
    for _ in range(warm):
        torch.ones(size)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(counted):
        torch.ones(size)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
out = {"before": faults()}
with reuse_freed_memory() as changed:
    out["inside"], out["changed"] = faults(), changed
out["after"] = faults(300_000_000, 1, 3)
with reuse_freed_memory(enabled=False) as changed:
    out["disabled"] = changed
print(json.dumps(out))
"""


def probe(**env: str) -> dict:
    theirs = ("LD_PRELOAD", "GLIBC_TUNABLES")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in theirs}
    result = subprocess.run([sys.executable, "-c", PROBE], env=clean | env, capture_output=True, text=True,
                            check=True, timeout=120)
    return json.loads(result.stdout)


def test_big_allocations_are_reused_inside_the_block_and_unmapped_again_after() -> None:
    pages = 10 * 100_000_000 // 4096  # what 10 fresh 100 MB tensors fault in
    out = probe()
    assert out["changed"] and not out["disabled"]
    assert out["before"] > 0.9 * pages  # glibc's default: each one mmapped and faulted in afresh
    assert out["inside"] < 0.05 * pages
    assert out["after"] > 0.9 * 3 * 1_200_000_000 // 4096  # the defaults are back: mmapped afresh each time


def test_a_users_own_malloc_settings_are_left_alone() -> None:
    out = probe(MALLOC_ARENA_MAX="2", MALLOC_TRIM_THRESHOLD_="1000000")
    assert not out["changed"]
