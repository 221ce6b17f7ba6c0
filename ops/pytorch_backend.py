"""Multi-scale deformable attention in plain PyTorch, through ``torch.nn.functional.grid_sample``.

Runs on any device and dtype that ``grid_sample`` supports and exports cleanly; the compiled kernels are faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _skip_samples_outside(
    attention_weights: torch.Tensor, sampling_locations: torch.Tensor, level_shapes: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """attention_weights (N, Lq, M, L, P) with 0 for a sample wholly outside its map, as the compiled kernels skip
    it: such a sample contributes exactly 0, not ``weight * 0`` (NaN for an infinite weight)."""
    compute = torch.float64 if sampling_locations.dtype == torch.float64 else torch.float32
    size = torch.tensor([[width, height] for height, width in level_shapes], dtype=compute)
    size = size.to(sampling_locations.device)[:, None, :]  # (L, 1, 2) as (W, H)
    pixel = sampling_locations.to(compute) * size - 0.5  # (N, Lq, M, L, P, 2)
    touches = ((pixel > -1) & (pixel < size)).all(-1)  # False for NaN too
    return torch.where(touches, attention_weights, torch.zeros_like(attention_weights))


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    level_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample every level with ``grid_sample`` and sum with the attention weights.

    Args:
        value: (N, S, M, D), the levels flattened one after another, row-major.
        level_shapes: L pairs (H, W) with sum(H * W) == S.
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D).
    """
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value_per_level = value.split([height * width for height, width in level_shapes], dim=1)
    # grid_sample with align_corners=False samples pixel (x * W - 0.5, y * H - 0.5) for x in [0, 1]
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(level_shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        level_value = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, height, width)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*M, D, Lq, P)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = _skip_samples_outside(attention_weights, sampling_locations, level_shapes)
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()
