"""Argument checks for :func:`ops.ms_deform_attn`.

Every check names the argument at fault and what was expected, so that a wrong call fails in Python with a
``ValueError`` or ``TypeError`` instead of crashing (or reading out of bounds) inside a kernel.
"""

from __future__ import annotations

import weakref

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
    float_coordinates: bool = False,
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
    mixed = float_coordinates and value.dtype in (torch.float16, torch.bfloat16)
    coordinates = (sampling_locations.dtype, attention_weights.dtype)
    if not (coordinates == (value.dtype, value.dtype) or (mixed and coordinates == (torch.float32, torch.float32))):
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


def _read_layout(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> tuple[list, list]:
    """The two small tensors on the host, in one device-to-host copy (one host sync on a GPU)."""
    flat = torch.cat((spatial_shapes.reshape(-1).long(), level_start_index.long())).tolist()
    levels = level_start_index.shape[0]
    return [flat[2 * level : 2 * level + 2] for level in range(levels)], flat[2 * levels :]


def _check_layout_values(shapes: list, starts: list, num_positions: int) -> None:
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


class _LayoutMemo:
    """The layouts already checked, keyed by the tensor objects and their version counters.

    A detector forward passes the same ``spatial_shapes``/``level_start_index`` to every encoder and decoder layer:
    reading them once instead of in every call saves a host sync per layer on a GPU, and a CUDA graph can be
    captured once they have been checked. An in-place change bumps a tensor's version and forces a new check.
    """

    _CAPACITY = 32

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int, int], tuple] = {}

    def lookup(self, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_positions: int):
        entry = self._entries.get((id(spatial_shapes), id(level_start_index), num_positions))
        if entry is None:
            return None
        shapes_ref, starts_ref, versions, level_shapes = entry
        alive = shapes_ref() is spatial_shapes and starts_ref() is level_start_index
        return level_shapes if alive and versions == _versions(spatial_shapes, level_start_index) else None

    def store(self, spatial_shapes, level_start_index, num_positions: int, level_shapes: list) -> None:
        if len(self._entries) >= self._CAPACITY:
            self._entries.pop(next(iter(self._entries)))
        self._entries[(id(spatial_shapes), id(level_start_index), num_positions)] = (
            weakref.ref(spatial_shapes),
            weakref.ref(level_start_index),
            _versions(spatial_shapes, level_start_index),
            level_shapes,
        )


def _versions(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> tuple:
    # Inference tensors (torch.inference_mode) have no version counter: for them only the storage is compared.
    return tuple(
        (None if tensor.is_inference() else tensor._version, tensor.data_ptr())
        for tensor in (spatial_shapes, level_start_index)
    )


_checked_layouts = _LayoutMemo()


def _capturing_cuda_graph(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def checked_level_shapes(
    spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_positions: int
) -> list[tuple[int, int]] | None:
    """Check the level layout once per pair of tensors (and version) and return the ``(H, W)`` of each level.

    Returns None, unchecked, while a CUDA graph is being captured (reading a GPU tensor is not allowed there; the
    kernels skip a level that lies outside value, so they stay in bounds). Check the tensors once before the
    capture (a warm-up call) to keep the check.
    """
    level_shapes = _checked_layouts.lookup(spatial_shapes, level_start_index, num_positions)
    if level_shapes is not None:
        return level_shapes
    if _capturing_cuda_graph(spatial_shapes.device):
        return None
    shapes, starts = _read_layout(spatial_shapes, level_start_index)
    _check_layout_values(shapes, starts, num_positions)
    level_shapes = [(int(height), int(width)) for height, width in shapes]
    _checked_layouts.store(spatial_shapes, level_start_index, num_positions, level_shapes)
    return level_shapes


def validate_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    check_layout: bool = True,
    float_coordinates: bool = False,
) -> list[tuple[int, int]] | None:
    """Raise ``TypeError``/``ValueError`` naming the argument if the op's inputs are inconsistent.

    ``float_coordinates`` also accepts float32 ``sampling_locations`` and ``attention_weights`` with a float16 or
    bfloat16 ``value`` (what the CPU kernel's forward runs as such).

    ``check_layout`` also reads ``spatial_shapes``/``level_start_index`` (one tiny device-to-host copy on a GPU,
    once per pair of tensors, see :func:`checked_level_shapes`) and returns the ``(H, W)`` of each level;
    otherwise, or while a CUDA graph is captured, returns None.
    """
    _check_tensor("value", value, 4)
    _check_tensor("spatial_shapes", spatial_shapes, 2)
    _check_tensor("level_start_index", level_start_index, 1)
    _check_tensor("sampling_locations", sampling_locations, 6)
    _check_tensor("attention_weights", attention_weights, 5)
    _check_types(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, float_coordinates)
    _check_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not check_layout:
        return None
    return checked_level_shapes(spatial_shapes, level_start_index, value.shape[1])
