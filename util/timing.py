"""The one timer of the repository: the median wall time of a call, synchronised on a GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``function()`` over ``repeats`` calls after ``warmup`` untimed ones; on a CUDA
    device timed with events, so that the GPU's work counts, not only its launch."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            function()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)
