"""The float64 multi-scale deformable attention that the backends are checked against (the tests and
``python -m ops.check``); it shares no code with them and does not use ``grid_sample``.

All levels, points and the four bilinear corners are handled at once: every corner becomes a row of value
(its level's start plus ``y * W + x``), gathered in one call. Differentiable through autograd. Memory grows as
N * Lq * M * L * P * 4 * D, so it is meant for small problems.
"""

from __future__ import annotations

import torch

# corner k of a sample is pixel (x_low + _CORNER_DX[k], y_low + _CORNER_DY[k])
_CORNER_DX = (0, 1, 0, 1)
_CORNER_DY = (0, 0, 1, 1)


def reference_ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``ms_deform_attn`` in float64 on the CPU.

    Args:
        value: (N, S, M, D).
        spatial_shapes: (L, 2) rows (H, W); level_start_index: (L,).
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) float64. Location (x, y) samples pixel (w, h) = (x * W - 0.5, y * H - 0.5) bilinearly with
        zeros outside the map; on an integer coordinate the location gradient is the one-sided one from above.
        A sample with h or w <= -1 or >= the size, or NaN, touches no pixel and contributes nothing, gradients
        included (at exactly -1 the one-sided gradient would otherwise reach pixel 0).
    """
    value, sampling_locations, attention_weights = (
        tensor.double().cpu() for tensor in (value, sampling_locations, attention_weights)
    )
    batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    shapes = spatial_shapes.long().cpu()
    height = shapes[:, 0].view(1, 1, 1, -1, 1, 1)  # broadcast over (N, Lq, M, L, P, corner)
    width = shapes[:, 1].view(1, 1, 1, -1, 1, 1)
    start = level_start_index.long().cpu().view(1, 1, 1, -1, 1, 1)
    x = sampling_locations[..., 0:1] * width - 0.5  # (N, Lq, M, L, P, 1) pixel column
    y = sampling_locations[..., 1:2] * height - 0.5
    touches = ((x > -1) & (x < width) & (y > -1) & (y < height)).detach()  # False for NaN too
    # a sample that touches nothing is moved to pixel 0 with weight 0, so that no NaN or infinity of it reaches
    # the output or a gradient
    x, y = torch.where(touches, x, 0.0), torch.where(touches, y, 0.0)
    attention_weights = torch.where(touches[..., 0], attention_weights, 0.0)
    x_low, y_low = x.detach().floor(), y.detach().floor()
    x_frac, y_frac = x - x_low, y - y_low
    dx = torch.tensor(_CORNER_DX, dtype=torch.float64)
    dy = torch.tensor(_CORNER_DY, dtype=torch.float64)
    corner_x, corner_y = x_low + dx, y_low + dy  # (N, Lq, M, L, P, 4)
    weight_x = torch.where(dx == 1, x_frac, 1 - x_frac)
    weight_y = torch.where(dy == 1, y_frac, 1 - y_frac)
    inside = (corner_x >= 0) & (corner_x < width) & (corner_y >= 0) & (corner_y < height)
    row = (
        start
        + corner_y.clamp(min=0).long().minimum(height - 1) * width
        + corner_x.clamp(min=0).long().minimum(width - 1)
    )
    coefficient = weight_x * weight_y * inside * attention_weights[..., None]  # (N, Lq, M, L, P, 4)
    per_head_value = value.permute(0, 2, 1, 3)  # (N, M, S, D)
    index = row.permute(0, 2, 1, 3, 4, 5).reshape(batch, heads, -1, 1).expand(-1, -1, -1, channels)
    gathered = per_head_value.gather(2, index).view(batch, heads, queries, -1, channels)  # (N, M, Lq, L*P*4, D)
    weights = coefficient.permute(0, 2, 1, 3, 4, 5).reshape(batch, heads, queries, -1, 1)
    output = (weights * gathered).sum(3)  # (N, M, Lq, D)
    return output.permute(0, 2, 1, 3).reshape(batch, queries, heads * channels)
