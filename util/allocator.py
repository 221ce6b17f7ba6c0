"""The C allocator told to keep freed memory for reuse (glibc on Linux), for CPU inference at large image sizes.

By default glibc's ``malloc`` serves every block above a threshold (dynamic, at most 32 MB on 64-bit) with a fresh
``mmap`` and returns it to the system when freed; a detector at 800x1333 allocates and frees tensors of that size
many times per forward, so each one is paged in anew (one page fault per 4 KiB). :func:`keep_freed_memory` raises
the mmap and trim thresholds so that freed blocks stay in the heap for the next forward: the prepared R50 at
800x1333 took 25,000-71,000 page faults per forward before and none after, 554-628 ms before and 449-480 ms after
on the 2-core Xeon (benchmarks/RESULTS.md); at 480x640 (no tensor above the threshold) nothing changes. The price:
the process keeps its peak memory until it exits. It applies to the whole process, for good.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEPT_BYTES = 1 << 30  # blocks up to 1 GiB from the heap; up to 1 GiB of free heap kept


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module's docstring). -> whether it applied
    (False where the C library is not glibc, e.g. macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEPT_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))
