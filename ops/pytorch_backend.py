"""Multi-scale deformable attention in plain PyTorch, through ``torch.nn.functional.grid_sample``.

Runs on any device and dtype that ``grid_sample`` supports and exports cleanly; the compiled kernels are faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L, P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    output = None
    for level, (height, width) in enumerate(level_shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        level_value = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, height, width)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # The bilinear weight that falls inside the map: 0 for a sample wholly outside it (and for a NaN location).
        # Sampled from a map of ones rather than compared with (H, W), so that an export keeps the sizes symbolic.
        inside = torch.ones_like(level_value[:, :1])
        touched = F.grid_sample(inside, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # A sample wholly outside its map contributes exactly 0, as the compiled kernels skip it (not weight * 0:
        # NaN for an infinite weight).
        level_weights = weights[:, :, :, level]  # (N*M, 1, Lq, P)
        level_weights = torch.where(touched > 0, level_weights, torch.zeros_like(level_weights))
        # each level summed as it is sampled: no (N*M, D, Lq, L*P) tensor of every level's samples is stacked (in
        # an exported graph that copy cost as much as a third of the sampling)
        summed = (sampled * level_weights).sum(-1)  # (N*M, D, Lq)
        output = summed if output is None else output + summed
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()
