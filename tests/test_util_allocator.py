"""util.allocator.keep_freed_memory: large blocks freed and allocated again are mostly not paged in anew (run in
fresh processes: the setting is process-wide and for good)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Page faults of three passes of a workload of 40 MB tensors (above glibc's largest dynamic mmap threshold, as the
# detector's at 800x1333), after ten passes to warm up, with or without keep_freed_memory().
PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from util.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
x = torch.randn(10 * 1024 * 1024)
def work():
    y = x * 2
    return float((y + 1)[0])
for _ in range(10):
    work()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    work()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(root=str(ROOT)), mode], capture_output=True, text=True, check=True
    )
    applied, count = result.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_large_block_freed_is_reused_without_page_faults():
    _, default = faults("default")
    applied, kept = faults("keep")
    assert applied == "True"
    assert default > 30_000  # six 40 MB tensors paged in anew: 10,240 pages of 4 KiB each
    # the freed blocks reused: measured 61,446 against 0 or 10,240 (now and then one block is mapped anew)
    assert kept < default / 2
