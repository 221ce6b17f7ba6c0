"""Forward latency and peak memory of the R50 Deformable DETR variants at 800x1333, random weights.

    python -m benchmarks.model [--variants deformable_detr two_stage] [--repeats 3] [--device cpu cuda]

Prints a Markdown table per device: batch size, how the model runs, median forward milliseconds, images/s and peak
memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak resident set of a fresh process that runs only
that row). CPU rows, batch 1: float32 eager; float32 under bfloat16 autocast; the inference path of
``models.inference.prepare_for_inference`` in float32 and in bfloat16.
CUDA rows: batch 1 and 4, float32 and bfloat16 autocast. The original reports 15.0 to 19.4 images/s for these
variants on a V100.
"""

from __future__ import annotations

import argparse
import resource

import torch

from benchmarks.harness import describe_machine, in_fresh_process
from models import PUBLISHED_VARIANTS, build_model, published_variant
from models.inference import prepare_for_inference
from util.timing import median_ms

HEIGHT, WIDTH = 800, 1333


# How a row runs the model: (prepared by models.inference in this dtype, or None: as built; autocast dtype or None).
MODES = {
    "float32": (None, None),
    "autocast bfloat16": (None, torch.bfloat16),
    "prepared float32": ("float32", None),
    "prepared bfloat16": ("bfloat16", None),
}


def measure(variant: str, device_type: str, batch: int, mode: str, repeats: int, warmup: int) -> tuple[float, float]:
    """-> (median forward ms, peak memory MiB) of one variant, batch and mode (a key of ``MODES``)."""
    torch.manual_seed(0)
    cfg = published_variant(variant).load_config(["pretrained_backbone=false"])
    device = torch.device(device_type)
    model = build_model(cfg)[0].to(device).eval()
    prepared, autocast = MODES[mode]
    if prepared is not None:
        model = prepare_for_inference(model, device, prepared)
    images = torch.randn(batch, 3, HEIGHT, WIDTH, device=device)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast or torch.float32, enabled=bool(autocast)):
            model(images)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    milliseconds = median_ms(forward, device, repeats, warmup)
    if device.type == "cuda":
        return milliseconds, torch.cuda.max_memory_allocated(device) / 2**20
    return milliseconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def run(variants: list[str], devices: list[str], repeats: int, warmup: int) -> list[str]:
    lines = []
    for device_type in devices:
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        lines.append(f"\n{device_type}: {describe_machine(torch.device(device_type))}, input {HEIGHT}x{WIDTH}")
        lines.append("| variant | batch | runs as | forward ms | images/s | peak memory MiB |")
        lines.append("|---|---:|---|---:|---:|---:|")
        rows = (
            [(1, mode) for mode in MODES]
            if device_type == "cpu"
            else [(batch, mode) for batch in (1, 4) for mode in ("float32", "autocast bfloat16")]
        )
        for variant in variants:
            for batch, mode in rows:
                arguments = (variant, device_type, batch, mode, repeats, warmup)
                if device_type == "cpu":  # a fresh process, so that its peak resident set is this row's alone
                    milliseconds, memory = in_fresh_process(measure, *arguments)
                else:
                    milliseconds, memory = measure(*arguments)
                row = (
                    f"| {variant} | {batch} | {mode} | {milliseconds:.0f} | "
                    f"{batch * 1e3 / milliseconds:.2f} | {memory:.0f} |"
                )
                lines.append(row)
                print(row, flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [variant.name for variant in PUBLISHED_VARIANTS]
    parser.add_argument("--variants", nargs="+", choices=names, default=names)
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    print("\n".join(run(args.variants, args.device, args.repeats, args.warmup)))


if __name__ == "__main__":
    main()
