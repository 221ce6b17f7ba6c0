"""An independent float64 multi-scale deformable attention for the tests: explicit bilinear corners and
gathers, no ``grid_sample``, differentiable through autograd."""

from __future__ import annotations

import torch


def reference_ms_deform_attn(
    value: torch.Tensor,
    level_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P)
    -> (N, Lq, M * D), computed in float64."""
    value, sampling_locations, attention_weights = (
        value.double(),
        sampling_locations.double(),
        attention_weights.double(),
    )
    assert sum(height * width for height, width in level_shapes) == value.shape[1]
    batch, _, heads, channels = value.shape
    queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    output = value.new_zeros(batch, queries, heads, channels)
    start = 0
    for level, (height, width) in enumerate(level_shapes):
        level_value = value[:, start : start + height * width].permute(0, 2, 1, 3)  # (N, M, HW, D)
        start += height * width
        x = sampling_locations[:, :, :, level, :, 0] * width - 0.5  # (N, Lq, M, P) pixel column
        y = sampling_locations[:, :, :, level, :, 1] * height - 0.5
        x_low, y_low = x.detach().floor(), y.detach().floor()
        # written as 1 - frac and frac (not 1 - |distance|) so that on an integer coordinate the gradient is
        # the one-sided derivative from above, as in grid_sample
        x_frac, y_frac = x - x_low, y - y_low
        # a sample whose pixel lies at or beyond -1 or the size (no corner with a positive weight inside) is skipped,
        # gradient included, as the op defines it; at exactly -1 the derivative from above would otherwise count
        touches = ((x > -1) & (x < width) & (y > -1) & (y < height)).detach()
        for y_corner, y_weight in ((y_low, 1 - y_frac), (y_low + 1, y_frac)):
            for x_corner, x_weight in ((x_low, 1 - x_frac), (x_low + 1, x_frac)):
                weight = x_weight * y_weight
                inside = (x_corner >= 0) & (x_corner <= width - 1) & (y_corner >= 0) & (y_corner <= height - 1)
                flat = (y_corner.clamp(0, height - 1) * width + x_corner.clamp(0, width - 1)).long()
                index = flat.permute(0, 2, 1, 3).reshape(batch, heads, queries * points, 1)
                gathered = level_value.gather(2, index.expand(-1, -1, -1, channels))  # (N, M, Lq*P, D)
                gathered = gathered.view(batch, heads, queries, points, channels).permute(0, 2, 1, 3, 4)
                coefficient = weight * inside * touches * attention_weights[:, :, :, level]  # (N, Lq, M, P)
                output = output + (coefficient[..., None] * gathered).sum(3)
    return output.reshape(batch, queries, heads * channels)
