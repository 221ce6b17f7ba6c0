"""What every benchmark shares besides the timer (``util.timing.median_ms``): a line describing the machine, and
a call in a fresh process."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable

import torch

from ops.backend_cache import device_name


def _call_with_threads(threads: int, function: Callable, arguments: tuple):
    torch.set_num_threads(threads)
    return function(*arguments)


def in_fresh_process(function: Callable, *arguments):
    """``function(*arguments)`` in a new (spawned) process with this process's torch thread count: its peak resident
    set and its oneDNN kernel caches are that call's alone. ``function`` must be importable (module level)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_call_with_threads, (torch.get_num_threads(), function, arguments))


def describe_machine(device: torch.device) -> str:
    """One line for a benchmark table: the device, and on the CPU what torch reports of its vector and bfloat16
    units (``get_cpu_capability``, AVX-512 BF16, AMX tiles)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    units = [torch.backends.cpu.get_cpu_capability()]
    units += [
        name
        for name, check in (("AVX-512 BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
        if getattr(torch.cpu, check, lambda: False)()
    ]
    return f"{device_name(device)} ({', '.join(units)}), {torch.get_num_threads()} threads, torch {torch.__version__}"
