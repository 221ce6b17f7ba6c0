"""Time every usable backend of ``ms_deform_attn`` on the shapes Deformable DETR runs.

    python -m benchmarks.msda [--cases encoder decoder coco_encoder] [--repeats 5] [--backends pytorch cpu]

Prints a Markdown table per device: median milliseconds of forward and of forward+backward per backend, case and
dtype (float32 and bfloat16), the speed-up over the pytorch backend, and time / memory floor. The floor is the time
the bytes a pass must move take at the copy bandwidth measured here (printed above the table): the forward reads
value, sampling locations and attention weights and writes the output; the backward reads grad_output and the
three inputs and writes their three gradients; the forward+backward floor is the sum. M=8 heads, D=32 channels,
P=4 points. The cpu backend runs its best loops for this CPU; "cpu portable" is it with DETR_MSDA_CPU_KERNEL=portable
(the loops a CPU without AVX-512 runs; ``--no-portable`` skips these rows). The triton backend is timed on a GPU
only (in Triton's CPU interpreter it is a correctness check, not a speed).
Then the deformable convolution and RoI pooling rows of :mod:`benchmarks.deform` (``--no-deform`` skips them).
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.harness import describe_machine
from ops import triton_backend
from ops.cases import CASES, backward_floor_bytes, copy_bandwidth, floor_bytes, make_inputs, time_backend
from ops.functional import available_backends


def _time_portable(inputs: dict[str, torch.Tensor], repeats: int, warmup: int) -> tuple[float, float]:
    """The cpu backend timed with its portable loops forced (DETR_MSDA_CPU_KERNEL=portable): a CPU without
    AVX-512 runs these."""
    previous = os.environ.get("DETR_MSDA_CPU_KERNEL")
    os.environ["DETR_MSDA_CPU_KERNEL"] = "portable"
    try:
        return time_backend("cpu", inputs, repeats, warmup)
    finally:
        if previous is None:
            del os.environ["DETR_MSDA_CPU_KERNEL"]
        else:
            os.environ["DETR_MSDA_CPU_KERNEL"] = previous


def run(
    cases: list[str], backends: list[str] | None, repeats: int, warmup: int, portable_too: bool = True
) -> list[str]:
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
        bandwidth = copy_bandwidth(device)
        lines.append(f"\n{device_type}: {describe_machine(device)}")
        lines.append(
            f"measured copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s; floor = the bytes a pass must move "
            "at that bandwidth (forward: inputs read, output written; backward: grad_output and inputs read, "
            "gradients written)"
        )
        lines.append(
            "| case | dtype | backend | forward ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up | fwd floor ms |"
            " fwd time/floor | fwd+bwd floor ms | fwd+bwd time/floor |"
        )
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for case_name in cases:
            for dtype in (torch.float32, torch.bfloat16):
                inputs = make_inputs(CASES[case_name], device, dtype)
                forward_floor_ms = floor_bytes(inputs) / bandwidth * 1e3
                both_floor_ms = forward_floor_ms + backward_floor_bytes(inputs) / bandwidth * 1e3
                timings = {}
                for b in device_backends:
                    timings[b] = time_backend(b, inputs, repeats, warmup)
                    if b == "cpu" and portable_too:
                        timings["cpu portable"] = _time_portable(inputs, repeats, warmup)
                base = timings.get("pytorch")
                for backend, (forward_ms, both_ms) in timings.items():
                    row = (
                        f"| {case_name} | {str(dtype).replace('torch.', '')} | {backend} | {forward_ms:.2f} | "
                        f"{both_ms:.2f} | "
                        + (f"{base[0] / forward_ms:.1f}x | {base[1] / both_ms:.1f}x |" if base else "- | - |")
                        + f" {forward_floor_ms:.2f} | {forward_ms / forward_floor_ms:.1f}x | {both_floor_ms:.2f} |"
                        f" {both_ms / both_floor_ms:.1f}x |"
                    )
                    lines.append(row)
                    print(row, flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.msda", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--backends", nargs="+", choices=["pytorch", "cpu", "cuda", "triton"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--no-portable", action="store_true", help="skip the cpu backend's rows with its portable loops forced"
    )
    parser.add_argument("--no-deform", action="store_true", help="skip the deformable convolution / RoI pooling rows")
    args = parser.parse_args(argv)
    lines = run(args.cases, args.backends, args.repeats, args.warmup, not args.no_portable)
    print("\n".join(lines))
    if not args.no_deform:
        from benchmarks.deform import run as run_deform

        run_deform(args.repeats)


if __name__ == "__main__":
    main()
