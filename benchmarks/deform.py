"""Time the deformable-convolution family on the CPU (rows of ``python -m benchmarks.msda``; alone:
``python -m benchmarks.deform``).

- ``deform_conv2d`` at a ResNet-50 conv4 shape (batch 1, 256 -> 256 channels, 3x3, the 50x84 map of an 800x1333
  image), v1 and v2, torchvision's kernel and the ``grid_sample`` formulation, against ``nn.Conv2d``.
- ``deform_roi_pool`` / ``deform_ps_roi_pool`` (the vectorised PyTorch formulation) at 128 RoIs, 7x7 bins, 2x2
  samples on the same map (256 channels; 10 * 49 for the PS variant), against torchvision's compiled
  ``roi_align`` / ``ps_roi_align`` (which have no offsets).

Median milliseconds of the forward (under ``no_grad``) and of forward+backward; ratio against the first row of
each block. Offsets of about 2 pixels (conv) or gamma * 1 RoI size (pooling), masks uniform in [0, 1].
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torchvision
from torch.nn import functional as F

from benchmarks.harness import describe_machine
from ops.deform_conv import deform_conv2d
from ops.deform_roi_pool import deform_ps_roi_pool, deform_roi_pool
from util.timing import median_ms

CHANNELS, HEIGHT, WIDTH = 256, 50, 84  # ResNet-50 conv4 at 800x1333
ROIS, BINS, PS_CHANNELS = 128, 7, 10


def _time(function: Callable[..., torch.Tensor], tensors: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Median ms of (forward without grad, forward + backward into every tensor)."""
    leaves = [tensor.detach().requires_grad_() for tensor in tensors]
    device = tensors[0].device

    def forward() -> None:
        with torch.no_grad():
            function(*leaves)

    def forward_backward() -> None:
        output = function(*leaves)
        output.backward(torch.ones_like(output))

    return median_ms(forward, device, repeats, warmup=1), median_ms(forward_backward, device, repeats, warmup=1)


def conv_cases(generator: torch.Generator) -> list[tuple[str, Callable, list[torch.Tensor]]]:
    input = torch.randn(1, CHANNELS, HEIGHT, WIDTH, generator=generator)
    weight = torch.randn(CHANNELS, CHANNELS, 3, 3, generator=generator) * 0.02
    offset = torch.randn(1, 18, HEIGHT, WIDTH, generator=generator) * 2
    mask = torch.rand(1, 9, HEIGHT, WIDTH, generator=generator)
    cases = [("nn.Conv2d (conv2d)", lambda x, w: F.conv2d(x, w, padding=1), [input, weight])]
    for backend in ("torchvision", "pytorch"):
        cases.append(
            (
                f"v1 {backend}",
                lambda x, w, o, b=backend: deform_conv2d(x, o, w, padding=1, backend=b),
                [input, weight, offset],
            )
        )
        cases.append(
            (
                f"v2 {backend}",
                lambda x, w, o, m, b=backend: deform_conv2d(x, o, w, padding=1, mask=m, backend=b),
                [input, weight, offset, mask],
            )
        )
    return cases


def pool_cases(generator: torch.Generator) -> tuple[list[tuple[str, Callable, list[torch.Tensor]]], ...]:
    """(RoI pooling cases, position-sensitive cases), each led by torchvision's op without offsets."""
    corners = torch.rand(ROIS, 2, 2, generator=generator) * torch.tensor([WIDTH, HEIGHT]) * 16
    boxes = torch.cat([torch.zeros(ROIS, 1), corners.min(1).values, corners.max(1).values + 16], 1)
    offset = (torch.rand(ROIS, 2, BINS, BINS, generator=generator) - 0.5) * 2
    mask = torch.rand(ROIS, 1, BINS, BINS, generator=generator)
    input = torch.randn(1, CHANNELS, HEIGHT, WIDTH, generator=generator)
    ps_input = torch.randn(1, PS_CHANNELS * BINS * BINS, HEIGHT, WIDTH, generator=generator)
    geometry = {"output_size": BINS, "spatial_scale": 1 / 16, "sampling_ratio": 2}
    plain = [
        ("roi_align (torchvision)", lambda x: torchvision.ops.roi_align(x, boxes, BINS, 1 / 16, 2), [input]),
        ("deform_roi_pool v1", lambda x, o: deform_roi_pool(x, boxes, o, **geometry), [input, offset]),
        ("deform_roi_pool v2", lambda x, o, m: deform_roi_pool(x, boxes, o, m, **geometry), [input, offset, mask]),
    ]
    position_sensitive = [
        ("ps_roi_align (torchvision)", lambda x: torchvision.ops.ps_roi_align(x, boxes, BINS, 1 / 16, 2), [ps_input]),
        ("deform_ps_roi_pool v1", lambda x, o: deform_ps_roi_pool(x, boxes, o, **geometry), [ps_input, offset]),
        (
            "deform_ps_roi_pool v2",
            lambda x, o, m: deform_ps_roi_pool(x, boxes, o, m, **geometry),
            [ps_input, offset, mask],
        ),
    ]
    return plain, position_sensitive


def run(repeats: int) -> list[str]:
    """The Markdown tables, one row printed as soon as it is measured."""
    generator = torch.Generator().manual_seed(0)
    lines = [f"\ndeformable convolution family, cpu: {describe_machine(torch.device('cpu'))}"]
    plain, position_sensitive = pool_cases(generator)
    blocks = (
        (f"deform_conv2d, 1x{CHANNELS}x{HEIGHT}x{WIDTH}, 3x3 -> {CHANNELS}", conv_cases(generator)),
        (f"RoI pooling, {ROIS} RoIs, {BINS}x{BINS} bins, 2x2 samples, {CHANNELS} channels", plain),
        (f"PS RoI pooling, same RoIs, {PS_CHANNELS} x {BINS * BINS} channels", position_sensitive),
    )
    for title, cases in blocks:
        lines += [
            f"| {title} | forward ms | fwd+bwd ms | forward / first | fwd+bwd / first |",
            "|---|---:|---:|---:|---:|",
        ]
        print("\n".join(lines[-2:]), flush=True)
        first = None
        for name, function, tensors in cases:
            forward_ms, both_ms = _time(function, tensors, repeats)
            first = first or (forward_ms, both_ms)
            ratios = f"{forward_ms / first[0]:.1f}x | {both_ms / first[1]:.1f}x"
            lines.append(f"| {name} | {forward_ms:.1f} | {both_ms:.1f} | {ratios} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.deform", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    run(parser.parse_args(argv).repeats)


if __name__ == "__main__":
    main()
