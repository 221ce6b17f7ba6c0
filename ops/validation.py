"""Argument checks for :func:`ops.ms_deform_attn`.

Every check names the argument at fault and what was expected, so that a wrong call fails in Python with a
``ValueError`` or ``TypeError`` instead of crashing (or reading out of bounds) inside a kernel.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, tensor: object, ndim: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    return tensor


def _check_sizes(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    batch, _, heads, channels = value.shape
    levels = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2) rows of (H, W), got shape {tuple(spatial_shapes.shape)}")
    if level_start_index.shape[0] != levels:
        raise ValueError(
            f"level_start_index has {level_start_index.shape[0]} entries but spatial_shapes has {levels} levels"
        )
    if levels == 0 or channels == 0 or heads == 0:
        raise ValueError(f"need at least one level, head and channel, got L={levels}, M={heads}, D={channels}")
    loc_batch, queries, loc_heads, loc_levels, points, two = sampling_locations.shape
    if two != 2:
        raise ValueError(f"sampling_locations last dimension must be 2 (x, y), got {two}")
    for what, got, expected in (
        ("N (batch)", loc_batch, batch),
        ("M (heads)", loc_heads, heads),
        ("L (levels)", loc_levels, levels),
    ):
        if got != expected:
            raise ValueError(f"sampling_locations {what} is {got} but value/spatial_shapes give {expected}")
    expected_weights = (batch, queries, heads, levels, points)
    if tuple(attention_weights.shape) != expected_weights:
        raise ValueError(
            f"attention_weights must have shape (N, Lq, M, L, P) = {expected_weights}, "
            f"got {tuple(attention_weights.shape)}"
        )


def _check_types(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor (int64), got {tensor.dtype}")
    for name, tensor in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {tensor.dtype}")
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise TypeError(
            "value, sampling_locations and attention_weights must share one dtype, got "
            f"{value.dtype}, {sampling_locations.dtype} and {attention_weights.dtype}"
        )
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if tensor.device != value.device:
            raise ValueError(f"{name} is on {tensor.device} but value is on {value.device}")


def check_level_layout(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_positions: int) -> None:
    """Check that the levels tile the ``num_positions`` rows of value exactly (reads the two small tensors)."""
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    expected_start = 0
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        if height <= 0 or width <= 0:
            raise ValueError(f"spatial_shapes[{level}] = ({height}, {width}): heights and widths must be positive")
        if start != expected_start:
            raise ValueError(
                f"level_start_index[{level}] = {start} but the levels before it cover {expected_start} positions"
            )
        expected_start += height * width
    if expected_start != num_positions:
        raise ValueError(
            f"spatial_shapes sums to {expected_start} positions but value has {num_positions} (dimension S)"
        )


def validate_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    check_layout: bool = True,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument if the op's inputs are inconsistent.

    ``check_layout`` also reads ``spatial_shapes``/``level_start_index`` (a tiny device-to-host copy on GPU).
    """
    _check_tensor("value", value, 4)
    _check_tensor("spatial_shapes", spatial_shapes, 2)
    _check_tensor("level_start_index", level_start_index, 1)
    _check_tensor("sampling_locations", sampling_locations, 6)
    _check_tensor("attention_weights", attention_weights, 5)
    _check_types(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if check_layout:
        check_level_layout(spatial_shapes, level_start_index, value.shape[1])
