"""Multi-scale deformable attention as deformable convolutions (``torchvision.ops.deform_conv2d``): the
formulation that ``main.py export --attention deformconv`` writes as ONNX ``DeformConv`` (opset 19).

Each level is one depthwise deformable convolution of the level's map with a 1 x P kernel of ones, one offset
group per head: output channel (m, d) at output position q is ``sum_p mask[q, m, p] * bilinear(value_l[m, d],
tap_p(q) + offset[q, m, p])``, which is the attention's level term when the mask is the attention weight and the
offset moves tap p of position q onto the sampling location. The queries are laid out on the convolution's output
grid, which the map's padding (zeros: they change no sample) makes as large as needed:

- ``grid`` (many queries, the encoder's self-attention): an output grid as wide as the widest level allows and
  ceil(Lq / width) rows;
- ``row`` (few queries, the decoder's): one output row of at least Lq positions, a vertical stride taller than any
  map, the columns made by the convolution's own zero padding (no padded copy of the map).

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


def _level_rows(heads: int, levels: int, points: int, level: int, device: torch.device) -> torch.Tensor:
    """Indices of the rows of (M, L, P, 2 as (x, y)) for ``level`` in the order (M, P, 2 as (y, x))."""
    head, point, coordinate = torch.meshgrid(
        torch.arange(heads), torch.arange(points), torch.tensor([1, 0]), indexing="ij"
    )
    return (((head * levels + level) * points + point) * 2 + coordinate).flatten().to(device)


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
    row_layout = _uses_row(queries, heights, grid_width)
    if row_layout:
        # padded by `shift` zero columns on either side, a map of any width has at least Lq output columns
        rows, columns, stride, shift = 1, queries, ROW_STRIDE, (queries + points) // 2
    else:
        tallest = functools.reduce(torch.sym_max, heights)
        rows, columns = torch.sym_max((queries + grid_width - 1) // grid_width, tallest), grid_width
        stride, shift = 1, 0
    outputs = rows * columns
    dtype, device = sampling_locations.dtype, value.device
    # Every op below runs on whole rows of the Lq queries, the last dimension, reached by transposing a matrix
    # (onnxruntime transposes 2-d and broadcasts along such rows fast, along short trailing dimensions slowly).
    # Where each (head, level, point) samples, (x, y) in pixels of its level: (N, Lq, M, L, P, 2) -> (N, M, L, P,
    # 2, Lq); grid_sample(align_corners=False) reads location x at pixel x * W - 0.5, so (x, y) * (W, H) in
    # (-0.5, (W, H) + 0.5) touches the map
    pixels = sampling_locations.reshape(batch, queries, -1).transpose(1, 2)
    one = torch.ones((), dtype=dtype, device=device)  # sizes as a tensor (a symbolic int times a tensor exports)
    size = torch.stack([one * side for height, width in level_shapes for side in (width, height)])
    size = size.view(1, 1, levels, 1, 2, 1)
    pixels = pixels.reshape(batch, heads, levels, points, 2, queries) * size
    if not torch.compiler.is_exporting():
        # A sample wholly outside its map, or at a NaN location, goes to -inf: torchvision's kernel would index
        # with a NaN, and it gives the edges -1 and H a location gradient where the other backends give none.
        # Not in the exported graph: there such a sample lies in the map's zero padding or beyond (onnxruntime's
        # DeformConv samples NaN as 0 too), and onnxruntime's Where costs more than the rest of this preparation.
        inside = (pixels > -0.5) & (pixels < size + 0.5)
        inside = inside[:, :, :, :, :1] & inside[:, :, :, :, 1:]  # (N, M, L, P, 1, Lq)
        pixels = torch.where(inside, pixels, torch.full_like(pixels, -math.inf))
    # each query's output position (row i, column j) and tap p sample (i * stride, j - shift + p) before their
    # offsets, shifted by the 0.5 of the pixel centres: (P, 2 as (x, y), Lq), made by expanding aranges (the
    # exporter cannot divide a tensor by a symbolic int)
    row = (torch.arange(rows, dtype=dtype, device=device) * stride).view(rows, 1).expand(rows, columns)
    column = torch.arange(columns, dtype=dtype, device=device).view(1, columns).expand(rows, columns)
    row, column = row.reshape(outputs)[:queries], column.reshape(outputs)[:queries]
    tap = torch.arange(points, dtype=dtype, device=device).view(points, 1)
    origin = torch.stack((column + (tap - shift), row.expand(points, queries)), 1) + 0.5
    # (N, M*L*P*2, Lq) and (N, M*L*P, Lq); the grid layout's padded to its rows * columns positions here
    offset = (pixels - origin).view(batch, -1, queries)
    mask = attention_weights.reshape(batch, queries, -1).transpose(1, 2)
    if not row_layout:
        offset, mask = F.pad(offset, (0, outputs - queries)), F.pad(mask, (0, outputs - queries))
    weight = value.new_ones(heads * channels, 1, 1, points)
    output, start = None, 0
    for level, (height, width) in enumerate(level_shapes):
        # (N, H*W, M, D) -> (N, M*D, H, W) (sliced, not split: sizes the exporter sees as symbolic make a split a
        # sequence, copied twice in onnxruntime)
        level_value = value[:, start : start + height * width].flatten(2).transpose(1, 2)
        level_value = level_value.reshape(batch, heads * channels, height, width)
        start = start + height * width
        # the level's rows of offset and mask in torchvision's order: offset group (head) first, (y, x) last
        rows_of_level = _level_rows(heads, levels, points, level, device)
        level_offset = offset.index_select(1, rows_of_level)
        level_mask = mask.index_select(1, rows_of_level[1::2] // 2)
        if not row_layout:  # grid: zeros below and to the right of the map up to the output grid's taps
            level_value = F.pad(level_value, (0, columns + points - 1 - width, 0, rows - height))
            level_columns = columns
        else:  # row: the convolution pads; the output row is as long as the padded map allows, Lq or more
            level_columns = width + 2 * shift - points + 1
            level_offset = F.pad(level_offset, (0, level_columns - queries))
            level_mask = F.pad(level_mask, (0, level_columns - queries))
        level_offset = level_offset.view(batch, heads * points * 2, rows, level_columns)
        level_mask = level_mask.view(batch, heads * points, rows, level_columns)
        sampled = deform_conv2d(
            level_value, level_offset, weight, stride=(stride, 1), padding=(0, shift), mask=level_mask
        )
        if row_layout:
            sampled = sampled.flatten(2)[:, :, :queries]  # (N, M*D, Lq): the levels' rows differ in length
        output = sampled if output is None else output + sampled  # (N, M*D, rows, columns) or (N, M*D, Lq)
    if not row_layout:  # the grid's positions after the Lq queries dropped (the row's were, level by level)
        output = output.flatten(2)[:, :, :queries]
    return output.transpose(1, 2)
