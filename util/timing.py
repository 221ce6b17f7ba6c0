"""The one timer of the repository: the median wall time of a call (or of calls timed in turns), synchronised on a
GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def median_ms(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``function()`` over ``repeats`` calls after ``warmup`` untimed ones; on a CUDA
    device timed with events, so that the GPU's work counts, not only its launch."""
    for _ in range(warmup):
        function()
    return statistics.median(_milliseconds(function, device) for _ in range(repeats))


def interleaved_medians(
    functions: Mapping[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    pause: float = 0.0,
) -> dict[str, float]:
    """:func:`median_ms` of every function, timed in turns (``repeats`` rounds, each calling every function once,
    after ``warmup`` such rounds untimed): a machine whose speed drifts (a busy neighbour) slows each alike.
    ``pause`` seconds of sleep before each call let the previous one's worker threads stop spinning (onnxruntime's
    slowed the next row's torch forward by 4% here)."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(warmup + repeats):
        for name, function in functions.items():
            time.sleep(pause)
            if round_ < warmup:
                function()
            else:
                times[name].append(_milliseconds(function, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _milliseconds(function: Callable[[], object], device: torch.device) -> float:
    """Wall milliseconds of one call of ``function()`` (CUDA: event-timed, synchronised)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    function()
    return (time.perf_counter() - begin) * 1e3
