"""Where the CPU kernel's time goes on the encoder cases: fetching the sampled rows, or the arithmetic around them.

    python -m benchmarks.msda_anatomy [--cases encoder coco_encoder] [--repeats 9]

Prints a Markdown table per case and dtype, cpu backend, median ms of forward and of forward+backward for:

- ``as sampled``: the inputs of ``ops.cases`` (each query samples around its own pixel, as the model's encoder);
- ``one point``: the same inputs with every sample moved to one point of each level (a jitter of 1e-3 keeps the
  bilinear weights general): the same arithmetic, every row from the first-level cache. ``as sampled`` minus
  ``one point`` is the time spent bringing the sampled rows in;
- ``heads first``: the inputs as sampled, laid out head-major ((N * M, S, 1, D) and the like: one head at a time)
  outside the timing, the layout a kernel would need to reuse a head's rows between neighbouring queries;

and the bytes of the corner rows each forward reads (4 corners x D channels per sample), their rate over the
``as sampled`` minus ``one point`` time, and the memory floor of :mod:`benchmarks.msda` (the bytes a pass must move
at the copy bandwidth measured here).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import describe_machine
from ops.cases import CASES, copy_bandwidth, floor_bytes, make_inputs, time_backend

ENCODER_CASES = [name for name, case in CASES.items() if case.queries is None]


def at_one_point(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs with every sampling location at (0.5, 0.5) of its level, jittered by up to 1e-3."""
    locations = inputs["sampling_locations"]
    generator = torch.Generator().manual_seed(1)
    jitter = torch.rand(locations.shape, generator=generator) * 1e-3
    return {**inputs, "sampling_locations": (0.5 + jitter).to(locations.dtype)}


def heads_first(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same problem as N * M problems of one head: value (N * M, S, 1, D), sampling_locations
    (N * M, Lq, 1, L, P, 2), attention_weights (N * M, Lq, 1, L, P)."""
    value, locations, weights = inputs["value"], inputs["sampling_locations"], inputs["attention_weights"]
    batch, positions, heads, channels = value.shape
    queries = locations.shape[1]
    return {
        **inputs,
        "value": value.transpose(1, 2).reshape(batch * heads, positions, 1, channels).contiguous(),
        "sampling_locations": locations.transpose(1, 2)
        .reshape(batch * heads, queries, 1, *locations.shape[3:])
        .contiguous(),
        "attention_weights": weights.transpose(1, 2)
        .reshape(batch * heads, queries, 1, *weights.shape[3:])
        .contiguous(),
    }


def corner_row_bytes(inputs: dict[str, torch.Tensor]) -> int:
    """Bytes of the corner rows a forward reads: 4 rows of D channels per sample."""
    samples = inputs["attention_weights"].numel()
    return samples * 4 * inputs["value"].shape[-1] * inputs["value"].element_size()


def run(cases: list[str], repeats: int, warmup: int) -> list[str]:
    device = torch.device("cpu")
    bandwidth = copy_bandwidth(device)
    lines = [
        f"cpu: {describe_machine(device)}",
        f"measured copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s",
        "| case | dtype | inputs | forward ms | fwd+bwd ms | corner rows MB | rows rate GB/s | fwd floor ms |"
        " fwd time/floor |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case_name in cases:
        for dtype in (torch.float32, torch.bfloat16):
            sampled = make_inputs(CASES[case_name], device, dtype)
            floor_ms = floor_bytes(sampled) / bandwidth * 1e3
            rows_mb = corner_row_bytes(sampled) / 1e6
            timings = {
                "as sampled": time_backend("cpu", sampled, repeats, warmup),
                "one point": time_backend("cpu", at_one_point(sampled), repeats, warmup),
                "heads first": time_backend("cpu", heads_first(sampled), repeats, warmup),
            }
            fetch_ms = timings["as sampled"][0] - timings["one point"][0]
            for label, (forward_ms, both_ms) in timings.items():
                rate = f"{rows_mb / fetch_ms:.1f}" if label == "as sampled" and fetch_ms > 0 else "-"
                row = (
                    f"| {case_name} | {str(dtype).replace('torch.', '')} | {label} | {forward_ms:.2f} | {both_ms:.2f} |"
                    f" {rows_mb:.0f} | {rate} | {floor_ms:.2f} | {forward_ms / floor_ms:.1f}x |"
                )
                lines.append(row)
                print(row, flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.msda_anatomy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cases", nargs="+", choices=ENCODER_CASES, default=ENCODER_CASES)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print("\n".join(run(args.cases, args.repeats, args.warmup)))


if __name__ == "__main__":
    main()
