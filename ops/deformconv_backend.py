"""Multi-scale deformable attention as deformable convolutions (``torchvision.ops.deform_conv2d``): the
formulation that ``main.py export --attention deformconv`` writes as ONNX ``DeformConv`` (opset 19).

Each level is one depthwise deformable convolution of the level's map with a 1 x P kernel of ones, one offset
group per head: output channel (m, d) at output position q is ``sum_p mask[q, m, p] * bilinear(value_l[m, d],
tap_p(q) + offset[q, m, p])``, which is the attention's level term when the mask is the attention weight and the
offset moves tap p of position q onto the sampling location. The queries are laid out on the convolution's output
grid, which the map's padding (zeros: they change no sample) makes as large as needed:

- ``grid`` (many queries, the encoder's self-attention): an output grid as wide as the widest level allows and
  ceil(Lq / width) rows;
- ``row`` (few queries, the decoder's): one output row of Lq positions, a vertical stride taller than any map.

Slow in PyTorch itself (torchvision's CPU kernel); in onnxruntime it samples about twice as fast as the
``grid_sample`` formulation of :mod:`ops.pytorch_backend` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

ROW_STRIDE = 1 << 16  # the ``row`` layout's vertical stride: one output row for any map of fewer rows


def _uses_row(queries: int | torch.SymInt, heights: list, width: int | torch.SymInt) -> bool:
    """Whether the ``row`` layout samples fewer positions than the ``grid`` one (whose grid covers every map).

    Traced with symbolic sizes the choice must not depend on them: symbolic queries are the encoder's (as many
    as the maps' positions: ``grid``), a fixed number of queries on symbolic maps the decoder's (``row``)."""
    if isinstance(queries, torch.SymInt):
        return False
    if any(isinstance(size, torch.SymInt) for size in (*heights, width)):
        return True
    return queries < max(heights) * width and max(heights) < ROW_STRIDE


def ms_deform_attn_deformconv(
    value: torch.Tensor,
    level_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The attention of :func:`ops.ms_deform_attn` through one ``deform_conv2d`` per level.

    Args:
        value: (N, S, M, D), the levels flattened one after another, row-major.
        level_shapes: L pairs (H, W) with sum(H * W) == S (ints, or symbolic ints while exporting).
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D). A sample wholly outside its map, or at a NaN location, contributes 0.
    """
    batch, _, heads, channels = value.shape
    queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    heights = [height for height, _ in level_shapes]
    widest = functools.reduce(torch.sym_max, [width for _, width in level_shapes])
    grid_width = torch.sym_max(widest - points + 1, 1)  # the grid layout's output width
    if _uses_row(queries, heights, grid_width):
        rows, columns, stride = 1, torch.sym_max(queries, grid_width), ROW_STRIDE
    else:
        tallest = functools.reduce(torch.sym_max, heights)
        rows, columns, stride = torch.sym_max((queries + grid_width - 1) // grid_width, tallest), grid_width, 1
    outputs = rows * columns
    dtype, device = sampling_locations.dtype, value.device
    # each query's output position (row i, column j) and tap p sample (i * stride, j + p) before their offsets,
    # shifted by the 0.5 of grid_sample's pixel centres (made by expanding aranges: the exporter cannot divide a
    # tensor by a symbolic int)
    row_origin = (torch.arange(rows, dtype=dtype, device=device) * stride).view(rows, 1).expand(rows, columns)
    row_origin = row_origin.reshape(outputs)[:queries].view(1, queries, 1, 1) + 0.5
    column = torch.arange(columns, dtype=dtype, device=device).view(1, columns).expand(rows, columns)
    tap = torch.arange(points, dtype=dtype, device=device) + 0.5
    tap_origin = (column.reshape(outputs)[:queries].view(queries, 1) + tap).view(1, queries, 1, points)
    # (N, Lq, M, L, P) -> (N, L, M*P, rows, columns), every level at once
    mask = attention_weights.permute(0, 3, 2, 4, 1).reshape(batch, levels, heads * points, queries)
    mask = F.pad(mask, (0, outputs - queries)).view(batch, levels, heads * points, rows, columns)
    weight = value.new_ones(heads * channels, 1, 1, points)
    value_per_level = value.split([height * width for height, width in level_shapes], dim=1)
    output = None
    for level, (height, width) in enumerate(level_shapes):
        # (N, H*W, M, D) -> (N, M*D, H, W), zeros below and to the right up to the output grid's taps
        level_value = value_per_level[level].reshape(batch, height, width, heads * channels).permute(0, 3, 1, 2)
        below = rows - height if stride == 1 else 0  # the row layout's one output row needs no rows added
        level_value = F.pad(level_value, (0, columns + points - 1 - width, 0, below))
        # grid_sample(align_corners=False) reads location x at pixel x * W - 0.5, so (x, y) * (W, H) in
        # (-0.5, (W, H) + 0.5) touches the map; a sample wholly outside it (or at a NaN location) goes to -inf,
        # where torchvision's kernel neither indexes with a NaN nor gives the edges -1 and H a gradient
        x = sampling_locations[:, :, :, level, :, 0] * width  # (N, Lq, M, P)
        y = sampling_locations[:, :, :, level, :, 1] * height
        inside = (x > -0.5) & (x < width + 0.5) & (y > -0.5) & (y < height + 0.5)
        far = torch.full_like(x, -math.inf)  # the same shape: onnxruntime's Where is slow when it broadcasts
        x, y = torch.where(inside, x, far) - tap_origin, torch.where(inside, y, far) - row_origin
        # (N, Lq, M, P, 2 as (y, x)) -> (N, M*P*2, rows, columns): torchvision's order, offset group (head) first
        offset = torch.stack((y, x), -1).reshape(batch, queries, heads * points * 2).transpose(1, 2)
        offset = F.pad(offset, (0, outputs - queries)).view(batch, heads * points * 2, rows, columns)
        sampled = deform_conv2d(level_value, offset, weight, stride=(stride, 1), mask=mask[:, level])
        output = sampled if output is None else output + sampled  # (N, M*D, rows, columns)
    return output.flatten(2)[:, :, :queries].transpose(1, 2)
