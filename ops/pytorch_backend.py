"""Multi-scale deformable attention in plain PyTorch: bilinear sampling as four gathers (one per corner of every
sampled pixel) from the flattened value, each weighted and summed by a batched matrix product.

Runs on any device and dtype and exports cleanly to ONNX (``Gather`` and ``MatMul``, which onnxruntime and OpenVINO
run faster than ``GridSample``); the compiled kernels are faster still.
"""

from __future__ import annotations

import torch

CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (dx, dy) of the four pixels around a sampling point


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample every level's four corners by index and sum them with the bilinear and attention weights.

    Args:
        value: (N, S, M, D), the levels flattened one after another, row-major.
        spatial_shapes: (L, 2) int64, rows (H, W), sum(H * W) == S; level_start_index: (L,) int64. Read as tensors,
            so that an exported graph keeps the image size dynamic.
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D). A corner outside its map contributes exactly 0 (not weight * 0: NaN for an infinite
        weight), as do all corners of a NaN location.
    """
    batch, positions, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = torch.promote_types(sampling_locations.dtype, torch.float32)  # pixel indices exact up to 2 ** 24
    # (N * M * S, D): row (n * M + m) * S + s
    rows = value.transpose(1, 2).reshape(batch * heads * positions, channels)
    first_row = torch.arange(batch * heads, device=value.device).view(batch, 1, heads, 1, 1) * positions
    first_row = first_row + level_start_index.view(1, 1, 1, levels, 1)  # (N, 1, M, L, 1)
    height = spatial_shapes[:, 0].to(dtype).view(levels, 1)
    width = spatial_shapes[:, 1].to(dtype).view(levels, 1)
    # location (x, y) in [0, 1] samples pixel (x * W - 0.5, y * H - 0.5), as grid_sample with align_corners=False
    x = sampling_locations[..., 0].to(dtype) * width - 0.5  # (N, Lq, M, L, P)
    y = sampling_locations[..., 1].to(dtype) * height - 0.5
    left, top = x.floor(), y.floor()
    # a sample at or beyond pixel -1 or the size touches nothing: no gradient either (False for NaN)
    touches = (x > -1) & (x < width) & (y > -1) & (y < height)
    right_share, bottom_share = x - left, y - top
    output = value.new_zeros(batch, queries, heads, 1, channels)
    for dx, dy in CORNERS:
        column, row = left + dx, top + dy
        inside = touches & (column >= 0) & (column < width) & (row >= 0) & (row < height)
        share = (right_share if dx else 1 - right_share) * (bottom_share if dy else 1 - bottom_share)
        weight = torch.where(inside, share * attention_weights.to(dtype), torch.zeros_like(share))
        offset = torch.where(inside, row * width + column, torch.zeros_like(share)).to(torch.int64)
        index = (first_row + offset).flatten(-2)  # (N, Lq, M, L * P)
        corner = rows[index.flatten()].view(batch, queries, heads, levels * points, channels)
        output = output + weight.flatten(-2).unsqueeze(-2).to(value.dtype) @ corner
    return output.view(batch, queries, heads * channels)
