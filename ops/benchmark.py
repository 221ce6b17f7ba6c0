"""Time every usable backend of ``ms_deform_attn`` on the shapes Deformable DETR runs.

    python -m ops.benchmark [--cases encoder decoder coco_encoder] [--repeats 5] [--backends pytorch cpu]

Prints a Markdown table: median milliseconds of forward and of forward+backward per backend, case and dtype
(float32; also bfloat16 on a GPU), the speed-up over the pytorch backend and, on a GPU, the achieved bandwidth
against the memory floor (value, sampling locations and attention weights read once, output written once, at the
device-to-device copy bandwidth measured here). M=8 heads, D=32 channels, P=4 points. The triton backend is
timed on a GPU only (in Triton's CPU interpreter it is a correctness check, not a speed).
Then the deformable convolution and RoI pooling rows of :mod:`ops.benchmark_deform` (``--no-deform`` skips them).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ops import triton_backend
from ops.backend_cache import device_name
from ops.functional import available_backends, ms_deform_attn

HEADS, CHANNELS, POINTS = 8, 32, 4


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    level_shapes: tuple[tuple[int, int], ...]
    queries: int | None  # None: one query per position (encoder self-attention)


CASES = {
    "encoder": Case("encoder", 2, ((64, 64), (32, 32), (16, 16), (8, 8)), None),
    "decoder": Case("decoder", 2, ((64, 64), (32, 32), (16, 16), (8, 8)), 300),
    "coco_encoder": Case("coco_encoder", 1, ((100, 167), (50, 84), (25, 42), (13, 21)), None),
}


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs sampled like the model samples: a reference point per query (the query's own pixel centre in
    the encoder, anywhere in the decoder) plus offsets of a few pixels."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case.level_shapes, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    positions = int(areas.sum())
    queries = positions if case.queries is None else case.queries
    levels = len(case.level_shapes)
    value = torch.randn(case.batch, positions, HEADS, CHANNELS, generator=generator)
    if case.queries is None:  # encoder: each query's reference is the centre of its own pixel
        centres = [
            torch.stack(
                torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1
            ).reshape(-1, 2)
            for h, w in case.level_shapes
        ]
        reference = torch.cat(centres)[None, :, None, None, None, :].expand(case.batch, -1, 1, 1, 1, 2)
    else:  # decoder: queries anywhere in the image
        reference = torch.rand(case.batch, queries, 1, 1, 1, 2, generator=generator)
    offsets = torch.randn(case.batch, queries, HEADS, levels, POINTS, 2, generator=generator) * 2.0
    sampling_locations = reference + offsets / shapes.flip(-1)[None, None, None, :, None, :]
    logits = torch.randn(case.batch, queries, HEADS, levels * POINTS, generator=generator)
    attention_weights = logits.softmax(-1).view(case.batch, queries, HEADS, levels, POINTS)
    tensors = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    tensors = {name: tensor.to(device=device, dtype=dtype) for name, tensor in tensors.items()}
    tensors["spatial_shapes"] = shapes.to(device)
    tensors["level_start_index"] = starts.to(device)
    return tensors


def _median_ms(function: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
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


def floor_bytes(inputs: dict[str, torch.Tensor]) -> int:
    """Bytes that must cross memory at least once: the three floating inputs read, the output written."""
    value = inputs["value"]
    output_elements = value.shape[0] * inputs["attention_weights"].shape[1] * value.shape[2] * value.shape[3]
    read = sum(inputs[name].numel() for name in ("value", "sampling_locations", "attention_weights"))
    return (read + output_elements) * value.element_size()


def copy_bandwidth(device: torch.device, size_bytes: int = 256 * 2**20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), copying ``size_bytes``."""
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds = _median_ms(lambda: target.copy_(source), device, repeats=20, warmup=3)
    return 2 * source.numel() / (milliseconds / 1e3)


def time_backend(backend: str, inputs: dict[str, torch.Tensor], repeats: int, warmup: int) -> tuple[float, float]:
    """Median ms of (forward, forward + backward)."""
    device = inputs["value"].device
    leaves = {name: tensor.detach().requires_grad_(tensor.is_floating_point()) for name, tensor in inputs.items()}
    args = [
        leaves[name]
        for name in ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    ]
    grad = None

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return ms_deform_attn(*args, backend=backend)

    def forward_backward() -> None:
        nonlocal grad
        output = ms_deform_attn(*args, backend=backend)
        if grad is None:
            grad = torch.randn_like(output)
        output.backward(grad)

    return (_median_ms(forward, device, repeats, warmup), _median_ms(forward_backward, device, repeats, warmup))


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


def run(cases: list[str], backends: list[str] | None, repeats: int, warmup: int) -> list[str]:
    usable = available_backends()
    chosen = [b for b in (backends or usable) if b in usable]
    lines = []
    triton_on_gpu = triton_backend.device_type() == "cuda"  # not its CPU interpreter: no speed measure
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        device_backends = [
            b
            for b in chosen
            if b in ("pytorch", device_type) or (b == "triton" and device_type == "cuda" and triton_on_gpu)
        ]
        device = torch.device(device_type)
        dtypes = [torch.float32] + ([torch.bfloat16] if device_type == "cuda" else [])
        bandwidth = copy_bandwidth(device) if device_type == "cuda" else None
        lines.append(f"\n{device_type}: {describe_machine(device)}")
        if bandwidth:
            lines.append(f"measured device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
        lines.append(
            "| case | dtype | backend | forward ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |"
            + (" fwd GB/s | fwd time/floor |" if bandwidth else "")
        )
        lines.append("|---|---|---|---:|---:|---:|---:|" + ("---:|---:|" if bandwidth else ""))
        for case_name in cases:
            for dtype in dtypes:
                inputs = make_inputs(CASES[case_name], device, dtype)
                timings = {b: time_backend(b, inputs, repeats, warmup) for b in device_backends}
                base = timings.get("pytorch")
                for backend, (forward_ms, both_ms) in timings.items():
                    row = (
                        f"| {case_name} | {str(dtype).replace('torch.', '')} | {backend} | {forward_ms:.2f} | "
                        f"{both_ms:.2f} | "
                        + (f"{base[0] / forward_ms:.1f}x | {base[1] / both_ms:.1f}x |" if base else "- | - |")
                    )
                    if bandwidth:
                        achieved = floor_bytes(inputs) / (forward_ms / 1e3)
                        floor_ms = floor_bytes(inputs) / bandwidth * 1e3
                        row += f" {achieved / 1e9:.0f} | {forward_ms / floor_ms:.1f}x |"
                    lines.append(row)
                    print(row, flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ops.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--backends", nargs="+", choices=["pytorch", "cpu", "cuda", "triton"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-deform", action="store_true", help="skip the deformable convolution / RoI pooling rows")
    args = parser.parse_args(argv)
    lines = run(args.cases, args.backends, args.repeats, args.warmup)
    print("\n".join(lines))
    if not args.no_deform:
        from ops.benchmark_deform import run as run_deform  # it imports this module's timer

        run_deform(args.repeats)


if __name__ == "__main__":
    main()
