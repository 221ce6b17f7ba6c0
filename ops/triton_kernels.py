"""Triton kernels of multi-scale deformable attention: the forward and the fused backward.

Imported only where triton is installed (``ops.triton_backend`` launches them). ``@triton.jit`` reads
``TRITON_INTERPRET`` when it decorates, i.e. when this module is imported: with ``TRITON_INTERPRET=1`` the kernels
run in Triton's CPU interpreter (on CPU tensors), otherwise they compile for the GPU.

Layouts (all contiguous): value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P); output and
grad_output (N, Lq, M * D). One program handles one batch element, BLOCK_Q queries and one head, with the D
channels as the vector dimension: every bilinear corner is one contiguous row of D channels, which the lanes of a
query load 16 bytes each (``ops.triton_backend`` picks the warps for that), and the corner geometry of a sample is
computed once per query for all its channels (by each of the query's lanes: Triton has no way to hand a lane its
own sample and share the result by shuffles, as the CUDA kernels do). Offsets inside one batch item of value are
int32 (the backend checks S * M * D < 2^31). Half types accumulate in ACC (float32; float64 for float64 inputs).
The backward reduces grad_output . corner once per corner (four sums per sample, from which the weight and
location gradients follow) rather than three gradient-weighted copies of the sampled row.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the kernels below were decorated


@triton.jit
def _tile(queries, heads, CHANNELS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head, query_head, query_mask, channels, channel_mask): batch int64; query_head
    (BLOCK_Q,) int64 is the row of (N, Lq, M) of each of its queries."""
    query_blocks = tl.cdiv(queries, BLOCK_Q)
    batch = (tl.program_id(0) // query_blocks).to(tl.int64)
    head = tl.program_id(1)
    query = (tl.program_id(0) % query_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    return batch, head, (batch * queries + query) * heads + head, query < queries, channels, channels < CHANNELS


@triton.jit
def _level(shapes_ptr, starts_ptr, level, positions):
    """(H, W, start) of a level as int32, and ok: false for a level outside value, which the kernels skip."""
    height = tl.load(shapes_ptr + 2 * level)
    width = tl.load(shapes_ptr + 2 * level + 1)
    start = tl.load(starts_ptr + level)
    ok = (height > 0) & (width > 0) & (start >= 0) & (start + height * width <= positions)
    return height.to(tl.int32), width.to(tl.int32), start.to(tl.int32), ok


@triton.jit
def _sample(location_rows, weight_rows, sample, query_mask, level_ok, height, width, ACC: tl.constexpr):
    """Bilinear geometry of sample ``sample`` (level * P + point) of BLOCK_Q queries, whose locations and weights
    start at ``location_rows`` and ``weight_rows``: location (x, y) samples pixel (x * W - 0.5, y * H - 0.5).

    Returns (inside, h_low, w_low, dh, dw, attention): inside is false where the sample touches no pixel of the map
    (it then contributes exactly zero), also for NaN locations; (h_low, w_low) is the top-left corner (int32, 0
    where not inside), (dh, dw) the fractional parts and attention the sample's weight (0 where not inside).
    """
    x = tl.load(location_rows + 2 * sample, mask=query_mask, other=0).to(ACC)
    y = tl.load(location_rows + 2 * sample + 1, mask=query_mask, other=0).to(ACC)
    h = y * height.to(ACC) - 0.5
    w = x * width.to(ACC) - 0.5
    inside = query_mask & (h > -1) & (w > -1) & (h < height.to(ACC)) & (w < width.to(ACC))
    # where(), not `& level_ok`: Triton 3.9's interpreter gives a scalar comparison the data type of its operands,
    # so `block & scalar_comparison` becomes an integer tensor, which tl.load refuses as a mask
    inside = tl.where(level_ok, inside, False)
    h_floor = tl.floor(tl.where(inside, h, 0.0))
    w_floor = tl.floor(tl.where(inside, w, 0.0))
    attention = tl.load(weight_rows + sample, mask=inside, other=0).to(ACC)
    return inside, h_floor.to(tl.int32), w_floor.to(tl.int32), h - h_floor, w - w_floor, attention


@triton.jit
def _corners(inside, h_low, w_low, height, width, start, head, heads, CHANNELS: tl.constexpr):
    """(offset, right, down, top, bottom, left, right_ok) of BLOCK_Q samples: the int32 offset in the batch item's
    value of the top-left corner's first channel, the steps to the corner on its right and below it, and which
    rows (top, bottom: also false where the sample is not inside) and columns of the 2 x 2 corners are in the
    map. An offset outside the map is never used: every access is masked by its corner's validity."""
    right = heads * CHANNELS
    offset = ((start + h_low * width + w_low) * heads + head) * CHANNELS
    top = inside & (h_low >= 0)
    bottom = inside & (h_low + 1 < height)
    return offset, right, width * right, top, bottom, w_low >= 0, w_low + 1 < width


@triton.jit
def _corner(offset, right, down, top, bottom, left_ok, right_ok, dh, dw, CORNER: tl.constexpr):
    """Corner CORNER (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right): (offset of its first channel,
    valid, row weight, column weight)."""
    lower: tl.constexpr = CORNER // 2 == 1
    later: tl.constexpr = CORNER % 2 == 1
    valid = (bottom if lower else top) & (right_ok if later else left_ok)
    offset = offset + (down if lower else 0) + (right if later else 0)
    return offset, valid, dh if lower else 1 - dh, dw if later else 1 - dw


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
    value_ptr += batch * positions * heads * CHANNELS  # this batch item's value: offsets into it are int32
    location_rows = locations_ptr + query_head * (levels * points * 2)
    weight_rows = weights_ptr + query_head * (levels * points)
    accumulator = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for level in range(levels):
        height, width, start, level_ok = _level(shapes_ptr, starts_ptr, level, positions)
        for point in range(points):
            inside, h_low, w_low, dh, dw, attention = _sample(
                location_rows, weight_rows, level * points + point, query_mask, level_ok, height, width, ACC
            )
            offset, right, down, top, bottom, left_ok, right_ok = _corners(
                inside, h_low, w_low, height, width, start, head, heads, CHANNELS
            )
            for corner in tl.static_range(4):
                corner_offset, valid, weight_h, weight_w = _corner(
                    offset, right, down, top, bottom, left_ok, right_ok, dh, dw, corner
                )
                # where(), not a product with zero: a corner outside the map adds exactly 0 even for an
                # infinite attention weight
                coefficient = tl.where(valid, attention * weight_h * weight_w, 0.0)
                accumulator += coefficient[:, None] * _gather(
                    value_ptr, corner_offset, valid, channels, channel_mask, ACC
                )
    mask = query_mask[:, None] & channel_mask[None, :]
    output = output_ptr + query_head[:, None] * CHANNELS + channels[None, :]
    tl.store(output, accumulator.to(output_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_corner(
    grad,
    value_ptr,
    grad_value_ptr,
    attention,
    corners,
    dh,
    dw,
    channels,
    channel_mask,
    ACC: tl.constexpr,
    CORNER: tl.constexpr,
):
    """Adds corner CORNER's share of grad_output to the value gradient (``corners``: :func:`_corners`'s tuple);
    returns grad_output . corner, (BLOCK_Q,)."""
    offset, right, down, top, bottom, left_ok, right_ok = corners
    offset, valid, weight_h, weight_w = _corner(offset, right, down, top, bottom, left_ok, right_ok, dh, dw, CORNER)
    coefficient = tl.where(valid, attention * weight_h * weight_w, 0.0)
    rows = offset[:, None] + channels[None, :]
    mask = valid[:, None] & channel_mask[None, :]
    # sem="relaxed": a sum, no ordering with other memory operations needed
    tl.atomic_add(grad_value_ptr + rows, coefficient[:, None] * grad, mask=mask, sem="relaxed")
    corner = tl.load(value_ptr + rows, mask=mask, other=0).to(ACC)
    return tl.sum(grad * corner, axis=1)


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
    and weight gradients of the program's samples is written (zero for a sample outside the map).

    With d_c = grad_output . corner c (top-left 00, top-right 01, bottom-left 10, bottom-right 11) the sampled
    row's gradients are: weight (1-dh)(1-dw) d00 + (1-dh) dw d01 + dh (1-dw) d10 + dh dw d11; along w
    (1-dh)(d01 - d00) + dh (d11 - d10); along h (1-dw)(d10 - d00) + dw (d11 - d01)."""
    batch, head, query_head, query_mask, channels, channel_mask = _tile(queries, heads, CHANNELS, BLOCK_Q, BLOCK_D)
    value_ptr += batch * positions * heads * CHANNELS  # this batch item: offsets into it are int32
    grad_value_ptr += batch * positions * heads * CHANNELS
    tile_mask = query_mask[:, None] & channel_mask[None, :]
    grad = tl.load(grad_output_ptr + query_head[:, None] * CHANNELS + channels[None, :], mask=tile_mask, other=0)
    grad = grad.to(ACC)
    location_rows = locations_ptr + query_head * (levels * points * 2)
    weight_rows = weights_ptr + query_head * (levels * points)
    grad_location_rows = grad_locations_ptr + query_head * (levels * points * 2)
    grad_weight_rows = grad_weights_ptr + query_head * (levels * points)
    out_type = grad_weights_ptr.dtype.element_ty
    for level in range(levels):
        height, width, start, level_ok = _level(shapes_ptr, starts_ptr, level, positions)
        for point in range(points):
            sample = level * points + point
            inside, h_low, w_low, dh, dw, attention = _sample(
                location_rows, weight_rows, sample, query_mask, level_ok, height, width, ACC
            )
            corners = _corners(inside, h_low, w_low, height, width, start, head, heads, CHANNELS)
            d00 = _backward_corner(
                grad, value_ptr, grad_value_ptr, attention, corners, dh, dw, channels, channel_mask, ACC, 0
            )
            d01 = _backward_corner(
                grad, value_ptr, grad_value_ptr, attention, corners, dh, dw, channels, channel_mask, ACC, 1
            )
            d10 = _backward_corner(
                grad, value_ptr, grad_value_ptr, attention, corners, dh, dw, channels, channel_mask, ACC, 2
            )
            d11 = _backward_corner(
                grad, value_ptr, grad_value_ptr, attention, corners, dh, dw, channels, channel_mask, ACC, 3
            )
            grad_weight = (1 - dh) * ((1 - dw) * d00 + dw * d01) + dh * ((1 - dw) * d10 + dw * d11)
            # d(w)/d(x) = W and d(h)/d(y) = H for w = x * W - 0.5, h = y * H - 0.5
            grad_x = attention * ((1 - dh) * (d01 - d00) + dh * (d11 - d10)) * width.to(ACC)
            grad_y = attention * ((1 - dw) * (d10 - d00) + dw * (d11 - d01)) * height.to(ACC)
            tl.store(grad_weight_rows + sample, tl.where(inside, grad_weight, 0.0).to(out_type), mask=query_mask)
            tl.store(grad_location_rows + 2 * sample, tl.where(inside, grad_x, 0.0).to(out_type), mask=query_mask)
            tl.store(grad_location_rows + 2 * sample + 1, tl.where(inside, grad_y, 0.0).to(out_type), mask=query_mask)
