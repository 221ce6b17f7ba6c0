"""Triton kernels of multi-scale deformable attention: the forward and the fused backward.

Imported only where triton is installed (``ops.triton_backend`` launches them). ``@triton.jit`` reads
``TRITON_INTERPRET`` when it decorates, i.e. when this module is imported: with ``TRITON_INTERPRET=1`` the kernels
run in Triton's CPU interpreter (on CPU tensors), otherwise they compile for the GPU.

Layouts (all contiguous): value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P); output and
grad_output (N, Lq, M * D). One program handles one batch element, BLOCK_Q queries and one head, with the D
channels as the vector dimension: every bilinear corner is one contiguous row of D channels (coalesced loads),
and the corner geometry of a sample is computed once for all its channels. Half types accumulate in ACC (float32;
float64 for float64 inputs).
"""

from __future__ import annotations

import triton
import triton.language as tl

# triton before 3.4 (torch before 2.8) has no knobs, and its interpreter cannot run these kernels (3.0, 3.2, 3.3 tried)
if not hasattr(triton, "knobs"):
    raise ImportError(f"the triton kernels need triton 3.4 or newer, this is triton {triton.__version__}")
INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the kernels below were decorated


@triton.jit
def _tile(queries, heads, CHANNELS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head, query_head, query_mask, channels, channel_mask); query_head (BLOCK_Q,) is the
    row of (N, Lq, M) of each of its queries, int64."""
    query_blocks = tl.cdiv(queries, BLOCK_Q)
    batch = (tl.program_id(0) // query_blocks).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    query = (tl.program_id(0) % query_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    return batch, head, (batch * queries + query) * heads + head, query < queries, channels, channels < CHANNELS


@triton.jit
def _level(shapes_ptr, starts_ptr, level, positions, batch, head, heads):
    """(H, W, level_row, ok): level_row is the row of (N, S, M) of the level's first pixel; ok is false for a level
    outside value, which the kernels skip."""
    height = tl.load(shapes_ptr + 2 * level)
    width = tl.load(shapes_ptr + 2 * level + 1)
    start = tl.load(starts_ptr + level)
    ok = (height > 0) & (width > 0) & (start >= 0) & (start + height * width <= positions)
    return height, width, (batch * positions + start) * heads + head, ok


@triton.jit
def _sample(locations_ptr, weights_ptr, sample, query_mask, level_ok, height, width, ACC: tl.constexpr):
    """Bilinear geometry of BLOCK_Q samples: location (x, y) samples pixel (x * W - 0.5, y * H - 0.5).

    Returns (inside, h_low, w_low, dh, dw, attention): inside is false where the sample touches no pixel of the map
    (it then contributes exactly zero), also for NaN locations; (h_low, w_low) is the top-left corner (int64, 0
    where not inside), (dh, dw) the fractional parts and attention the sample's weight (0 where not inside).
    """
    x = tl.load(locations_ptr + 2 * sample, mask=query_mask, other=0).to(ACC)
    y = tl.load(locations_ptr + 2 * sample + 1, mask=query_mask, other=0).to(ACC)
    h = y * height.to(ACC) - 0.5
    w = x * width.to(ACC) - 0.5
    inside = query_mask & (h > -1) & (w > -1) & (h < height.to(ACC)) & (w < width.to(ACC))
    # where(), not `& level_ok`: Triton 3.9's interpreter gives a scalar comparison the data type of its operands,
    # so `block & scalar_comparison` becomes an integer tensor, which tl.load refuses as a mask
    inside = tl.where(level_ok, inside, False)
    h_floor = tl.floor(tl.where(inside, h, 0.0))
    w_floor = tl.floor(tl.where(inside, w, 0.0))
    attention = tl.load(weights_ptr + sample, mask=inside, other=0).to(ACC)
    return inside, h_floor.to(tl.int64), w_floor.to(tl.int64), h - h_floor, w - w_floor, attention


@triton.jit
def _corner(
    inside, h_low, w_low, dh, dw, height, width, level_row, heads, CORNER: tl.constexpr, CHANNELS: tl.constexpr
):
    """Corner CORNER (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of BLOCK_Q samples:
    (offset of its first channel in value, valid, row weight, column weight). A corner outside the map is not
    valid (zero padding) and points at the level's first pixel."""
    row = h_low + CORNER // 2
    column = w_low + CORNER % 2
    valid = inside & (row >= 0) & (row < height) & (column >= 0) & (column < width)
    position = tl.where(valid, row * width + column, 0)
    weight_h = dh if CORNER // 2 == 1 else 1 - dh
    weight_w = dw if CORNER % 2 == 1 else 1 - dw
    return (level_row + position * heads) * CHANNELS, valid, weight_h, weight_w


@triton.jit
def _gather(value_ptr, offset, valid, channels, channel_mask, ACC: tl.constexpr):
    """(BLOCK_Q, BLOCK_D) value rows at ``offset``, zeros where not valid."""
    mask = valid[:, None] & channel_mask[None, :]
    return tl.load(value_ptr + offset[:, None] + channels[None, :], mask=mask, other=0).to(ACC)


@triton.jit
def ms_deform_attn_forward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    locations_ptr,
    weights_ptr,
    output_ptr,
    queries,
    positions,
    heads,
    levels,
    points,
    CHANNELS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (N * cdiv(Lq, BLOCK_Q), M): output[n, q, m] = sum_l,p A * bilinear(value_l[n, :, m], loc)."""
    batch, head, query_head, query_mask, channels, channel_mask = _tile(queries, heads, CHANNELS, BLOCK_Q, BLOCK_D)
    accumulator = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for level in range(levels):
        height, width, level_row, level_ok = _level(shapes_ptr, starts_ptr, level, positions, batch, head, heads)
        for point in range(points):
            sample = (query_head * levels + level) * points + point
            inside, h_low, w_low, dh, dw, attention = _sample(
                locations_ptr, weights_ptr, sample, query_mask, level_ok, height, width, ACC
            )
            for corner in tl.static_range(4):
                offset, valid, weight_h, weight_w = _corner(
                    inside, h_low, w_low, dh, dw, height, width, level_row, heads, corner, CHANNELS
                )
                # where(), not a product with zero: a corner outside the map adds exactly 0 even for an
                # infinite attention weight
                coefficient = tl.where(valid, attention * weight_h * weight_w, 0.0)
                accumulator += coefficient[:, None] * _gather(value_ptr, offset, valid, channels, channel_mask, ACC)
    mask = query_mask[:, None] & channel_mask[None, :]
    output = output_ptr + query_head[:, None] * CHANNELS + channels[None, :]
    tl.store(output, accumulator.to(output_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ms_deform_attn_backward_kernel(
    grad_output_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    locations_ptr,
    weights_ptr,
    grad_value_ptr,
    grad_locations_ptr,
    grad_weights_ptr,
    queries,
    positions,
    heads,
    levels,
    points,
    CHANNELS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid as the forward. grad_value (ACC, zero-filled) receives atomic adds; every element of the location
    and weight gradients of the program's samples is written (zero for a sample outside the map)."""
    batch, head, query_head, query_mask, channels, channel_mask = _tile(queries, heads, CHANNELS, BLOCK_Q, BLOCK_D)
    tile_mask = query_mask[:, None] & channel_mask[None, :]
    grad_rows = grad_output_ptr + query_head[:, None] * CHANNELS + channels[None, :]
    grad = tl.load(grad_rows, mask=tile_mask, other=0).to(ACC)
    out_type = grad_weights_ptr.dtype.element_ty
    for level in range(levels):
        height, width, level_row, level_ok = _level(shapes_ptr, starts_ptr, level, positions, batch, head, heads)
        for point in range(points):
            sample = (query_head * levels + level) * points + point
            inside, h_low, w_low, dh, dw, attention = _sample(
                locations_ptr, weights_ptr, sample, query_mask, level_ok, height, width, ACC
            )
            sampled = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)  # bilinear(value, loc)
            d_sampled_dh = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)  # its derivative along the row coordinate
            d_sampled_dw = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
            for corner in tl.static_range(4):
                offset, valid, weight_h, weight_w = _corner(
                    inside, h_low, w_low, dh, dw, height, width, level_row, heads, corner, CHANNELS
                )
                corner_value = _gather(value_ptr, offset, valid, channels, channel_mask, ACC)
                sampled += (weight_h * weight_w)[:, None] * corner_value
                d_sampled_dh += ((1.0 if corner // 2 == 1 else -1.0) * weight_w)[:, None] * corner_value
                d_sampled_dw += ((1.0 if corner % 2 == 1 else -1.0) * weight_h)[:, None] * corner_value
                coefficient = tl.where(valid, attention * weight_h * weight_w, 0.0)
                tl.atomic_add(
                    grad_value_ptr + offset[:, None] + channels[None, :],
                    coefficient[:, None] * grad,
                    mask=valid[:, None] & channel_mask[None, :],
                    sem="relaxed",  # a sum: no ordering with other memory operations needed
                )
            grad_weight = tl.sum(grad * sampled, axis=1)
            # d(h)/d(y) = H and d(w)/d(x) = W for h = y * H - 0.5, w = x * W - 0.5
            grad_x = attention * tl.sum(grad * d_sampled_dw, axis=1) * width.to(ACC)
            grad_y = attention * tl.sum(grad * d_sampled_dh, axis=1) * height.to(ACC)
            tl.store(grad_weights_ptr + sample, tl.where(inside, grad_weight, 0.0).to(out_type), mask=query_mask)
            tl.store(grad_locations_ptr + 2 * sample, tl.where(inside, grad_x, 0.0).to(out_type), mask=query_mask)
            tl.store(grad_locations_ptr + 2 * sample + 1, tl.where(inside, grad_y, 0.0).to(out_type), mask=query_mask)
