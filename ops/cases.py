"""The problems ``python -m ops.check`` times and ``python -m benchmarks.msda`` reports: the attention's shapes in
Deformable DETR, inputs sampled as the model samples, the memory floors of the forward and the backward, and the
timing of one backend.

M=8 heads, D=32 channels, P=4 points; ``encoder`` and ``decoder`` at a 512x512 image, ``coco_encoder`` at 800x1333.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.functional import ms_deform_attn
from util.timing import median_ms

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


def _elements(inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(elements of value, sampling_locations and attention_weights together, elements of the output)."""
    value = inputs["value"]
    output = value.shape[0] * inputs["attention_weights"].shape[1] * value.shape[2] * value.shape[3]
    return sum(inputs[name].numel() for name in ("value", "sampling_locations", "attention_weights")), output


def floor_bytes(inputs: dict[str, torch.Tensor]) -> int:
    """Bytes the forward must move at least once: the three floating inputs read, the output written."""
    floating, output = _elements(inputs)
    return (floating + output) * inputs["value"].element_size()


def backward_floor_bytes(inputs: dict[str, torch.Tensor]) -> int:
    """Bytes the backward must move at least once: grad_output and the three floating inputs read, their three
    gradients written (each of its input's size and dtype)."""
    floating, output = _elements(inputs)
    return (output + 2 * floating) * inputs["value"].element_size()


def copy_bandwidth(device: torch.device, size_bytes: int = 256 * 2**20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), copying ``size_bytes``."""
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds = median_ms(lambda: target.copy_(source), device, repeats=20, warmup=3)
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
        for leaf in leaves.values():
            leaf.grad = None  # as a training step's zero_grad: no accumulation into earlier gradients timed
        output = ms_deform_attn(*args, backend=backend)
        if grad is None:
            grad = torch.randn_like(output)
        output.backward(grad)

    return (median_ms(forward, device, repeats, warmup), median_ms(forward_backward, device, repeats, warmup))
