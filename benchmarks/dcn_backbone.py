"""Is the deformable convolution the bottleneck of a DCN backbone's training step on the CPU?

    python -m benchmarks.dcn_backbone [--config configs/demo_shapes_dcn.yaml] [--batch 8] [--size 96] [--repeats 3]

Times forward + backward of the config's backbone (random weights) on a random batch: the plain backbone
(``dcn_stages=[]``) and the DCN one with each ``ops.deform_conv2d`` backend, and the share of the step's CPU time
spent in the deformable convolution's own ops (torchvision's kernels, or ``grid_sample`` and its backward),
from ``torch.profiler``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import describe_machine
from models.backbone import build_backbone
from ops.deform_conv import DeformConv2d
from util.config import load_config
from util.timing import median_ms

DEFORM_OPS = ("deform_conv2d", "grid_sampler")  # profiler keys (substrings) of the deformable convolution's ops


def deform_share(step) -> float:
    """Fraction of one ``step()``'s self CPU time in :data:`DEFORM_OPS`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    events = profile.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    deform = sum(event.self_cpu_time_total for event in events if any(op in event.key for op in DEFORM_OPS))
    return deform / max(total, 1)


def run(config: str, batch: int, size: int, repeats: int) -> list[str]:
    images = torch.randn(batch, 3, size, size)
    padding_mask = torch.zeros(batch, size, size, dtype=torch.bool)
    lines = [
        f"\ncpu: {describe_machine(torch.device('cpu'))}; {config} backbone, batch {batch} at {size}x{size}",
        "| backbone | deform_conv2d backend | fwd+bwd ms | deformable conv share of CPU time |",
        "|---|---|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for dcn, backend in ((False, "-"), (True, "torchvision"), (True, "pytorch")):
        torch.manual_seed(0)
        backbone = build_backbone(load_config(config, overrides=[] if dcn else ["dcn_stages=[]"]))
        for module in backbone.modules():
            if isinstance(module, DeformConv2d):
                module.backend = backend

        def step(backbone: torch.nn.Module = backbone) -> None:
            features, _, _ = backbone(images, padding_mask)
            sum(feature.sum() for feature in features).backward()

        milliseconds = median_ms(step, torch.device("cpu"), repeats, warmup=1)
        share = f"{deform_share(step):.0%}" if dcn else "-"
        lines.append(f"| {'DCN' if dcn else 'plain'} | {backend} | {milliseconds:.0f} | {share} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dcn_backbone",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/demo_shapes_dcn.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.config, args.batch, args.size, args.repeats)


if __name__ == "__main__":
    main()
