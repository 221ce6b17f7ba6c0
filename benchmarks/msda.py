"""Time every usable backend of ``ms_deform_attn`` on the shapes Deformable DETR runs.

    python -m benchmarks.msda [--cases encoder decoder coco_encoder] [--repeats 5] [--backends pytorch cpu]

Prints a Markdown table: median milliseconds of forward and of forward+backward per backend, case and dtype
(float32; also bfloat16 on a GPU), the speed-up over the pytorch backend and, on a GPU, the achieved bandwidth
against the memory floor (value, sampling locations and attention weights read once, output written once, at the
device-to-device copy bandwidth measured here). M=8 heads, D=32 channels, P=4 points. The triton backend is
timed on a GPU only (in Triton's CPU interpreter it is a correctness check, not a speed).
Then the deformable convolution and RoI pooling rows of :mod:`benchmarks.deform` (``--no-deform`` skips them).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import describe_machine
from ops import triton_backend
from ops.cases import CASES, copy_bandwidth, floor_bytes, make_inputs, time_backend
from ops.functional import available_backends


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
        prog="python -m benchmarks.msda", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        from benchmarks.deform import run as run_deform

        run_deform(args.repeats)


if __name__ == "__main__":
    main()
