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
    # grid_sample with align_corners=False samples pixel (x * W - 0.5, y * H - 0.5) for x in [0, 1].
    # Points before queries: (N, Lq, M, L, P, 2) -> (N, M, L, P, Lq, 2), and (N, Lq, M, L, P) -> (N, M, L, P, Lq),
    # so that each level's weighted sum reduces over P in whole rows of queries (in onnxruntime 3x faster than
    # over a last dimension of P)
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5)
    weights = (
        attention_weights.reshape(batch, queries, -1).transpose(1, 2).reshape(batch, heads, levels, points, queries)
    )
    exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()  # the dynamo or torchscript exporter
    output, start = None, 0
    for level, (height, width) in enumerate(level_shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W), sliced (a split of sizes the exporter sees as symbolic becomes a
        # sequence, copied twice in onnxruntime)
        level_value = value[:, start : start + height * width].flatten(2).transpose(1, 2)
        level_value = level_value.reshape(batch * heads, channels, height, width)
        start = start + height * width
        level_grid = grids[:, :, level].flatten(0, 1)  # (N*M, P, Lq, 2)
        sampled = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        level_weights = weights[:, :, level].reshape(batch * heads, 1, points, queries)
        if not exporting:
            # The bilinear weight that falls inside the map: 0 for a sample wholly outside it (and for a NaN
            # location), which then contributes exactly 0, as the compiled kernels skip it (not weight * 0: NaN for
            # an infinite weight). Sampled from a map of ones rather than compared with (H, W), which keeps sizes
            # symbolic. Not in the exported graph, whose weights are a softmax's: a finite weight times the 0 of the
            # zero padding is 0 (and onnxruntime's GridSample samples NaN and infinite locations as a pixel anyway).
            inside = torch.ones_like(level_value[:, :1])
            touched = F.grid_sample(inside, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            level_weights = torch.where(touched > 0, level_weights, torch.zeros_like(level_weights))
        # each level summed as it is sampled: no (N*M, D, L*P, Lq) tensor of every level's samples is stacked (in
        # an exported graph that copy cost as much as a third of the sampling)
        summed = (sampled * level_weights).sum(2)  # (N*M, D, Lq)
        output = summed if output is None else output + summed
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()
