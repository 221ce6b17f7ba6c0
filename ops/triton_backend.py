"""The ``"triton"`` backend of ``ms_deform_attn``: launches the kernels of :mod:`ops.triton_kernels`.

Usable where triton imports (it ships with the CUDA build of torch) and either a GPU is visible (the kernels
compile for it and run on CUDA tensors) or ``TRITON_INTERPRET=1`` was set before :mod:`ops.triton_kernels` was
first imported (the kernels then run in Triton's CPU interpreter on CPU tensors: slow, for verification only).

The launches are the torch.library custom ops ``deformable_detr::ms_deform_attn_triton_forward`` / ``_backward``
with fake implementations and registered autograd, so gradients flow and ``torch.compile`` traces through them.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ops import custom_ops

# A program's (BLOCK_Q, BLOCK_D) tile holds about 256 elements (2048-element tiles used all 255 registers and
# spilled up to 2.6 kB), on as many warps as give every lane 16 bytes of a query's channels: Triton then lays the
# tile out as the CUDA kernels do, a group of D / (16 bytes) lanes per query, one 16-byte load per corner and lane
# (float32: 2 warps, 8 lanes x 4 channels per query; bfloat16: 1 warp, 4 lanes x 8 channels). Its atomic adds
# come out as the CUDA kernels' do on sm_90 (one red.global.add.v4.f32 per corner and lane) and, on sm_80, Triton
# re-lays them out so that a warp's scalar adds cover 128 contiguous bytes (4 sectors per row and instruction).
TILE_ELEMENTS = 256
LANE_BYTES = 16
MAX_BLOCK_QUERIES = 64
POISON_OUTPUTS = False  # fill outputs with NaN before a launch, so that an element never written shows (tests)


@functools.cache
def _kernels():
    """The kernel module, or None where triton does not import."""
    try:
        from ops import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def is_available() -> bool:
    """True where triton imports and the kernels can run: on a GPU, or in Triton's interpreter."""
    kernels = _kernels()
    return kernels is not None and (kernels.INTERPRETED or torch.cuda.is_available())


def device_type() -> str:
    """The device the backend runs on: "cpu" under the interpreter, else "cuda"."""
    kernels = _kernels()
    return "cpu" if kernels is not None and kernels.INTERPRETED else "cuda"


def _loaded_kernels():
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError(
            "backend 'triton' needs the triton package (it ships with the CUDA build of torch); "
            "install it or pick another backend"
        )
    return kernels


def check_usable(device: torch.device) -> None:
    """Raise a clear error if the triton backend cannot run on tensors of ``device``."""
    _loaded_kernels()
    if not is_available():
        raise RuntimeError(
            "backend 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 set before ops.triton_kernels is imported "
            "to run Triton's CPU interpreter"
        )
    if device.type != device_type():
        hint = " (the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1)" if device_type() == "cpu" else ""
        raise ValueError(f"backend 'triton' runs on {device_type()} tensors{hint} but value is on {device}")


def _accumulate_type(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _new_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _power_of_two_at_least(count: int) -> int:
    return 1 << max(0, count - 1).bit_length()


def block_sizes(queries: int, channels: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D) of a program: all D channels (a power of two), as many queries as fill the tile."""
    block_channels = _power_of_two_at_least(channels)
    block_queries = min(MAX_BLOCK_QUERIES, max(1, TILE_ELEMENTS // block_channels), _power_of_two_at_least(queries))
    return block_queries, block_channels


def warps_for(block_queries: int, block_channels: int, element_size: int) -> int:
    """Warps of a program: each of its 32 lanes holds LANE_BYTES of the tile (1 to 4 warps)."""
    return max(1, min(4, block_queries * block_channels * element_size // (32 * LANE_BYTES)))


def _launch_config(value: torch.Tensor, sampling_locations: torch.Tensor) -> tuple[tuple[int, int], dict]:
    """(grid, keyword arguments) shared by the forward and the backward launch."""
    batch, positions, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    block_queries, block_channels = block_sizes(queries, channels)
    grid = (batch * ((queries + block_queries - 1) // block_queries), heads)
    return grid, {
        "queries": queries,
        "positions": positions,
        "heads": heads,
        "levels": levels,
        "points": points,
        "CHANNELS": channels,
        "ACC": _accumulate_type(value.dtype),
        "BLOCK_Q": block_queries,
        "BLOCK_D": block_channels,
        "num_warps": warps_for(block_queries, block_channels, value.element_size()),
    }


def _check_layout(*tensors: torch.Tensor) -> None:
    """The kernels index raw memory: a direct call through torch.ops must not hand them another layout."""
    if not all(tensor.is_contiguous() for tensor in tensors):
        raise ValueError("the triton kernels need contiguous inputs (ops.ms_deform_attn makes them so)")
    if not tensors[1].dtype == tensors[2].dtype == torch.int64:
        raise TypeError("the triton kernels need int64 spatial_shapes and level_start_index")
    if tensors[0][0].numel() > 2**31 - 1:
        raise ValueError(
            f"the triton kernels index one batch item of value (S * M * D = {tensors[0][0].numel()} elements) with "
            'int32, at most 2^31 - 1 elements: use smaller feature maps or backend="pytorch"'
        )


def _on_device(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("deformable_detr::ms_deform_attn_triton_forward", mutates_args=())
def _forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    _check_layout(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, _, heads, channels = value.shape
    output = _new_output((batch, sampling_locations.shape[1], heads * channels), value)
    if output.numel() == 0:
        return output
    grid, arguments = _launch_config(value, sampling_locations)
    with _on_device(value):
        _loaded_kernels().ms_deform_attn_forward_kernel[grid](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output, **arguments
        )
    return output


@torch.library.custom_op("deformable_detr::ms_deform_attn_triton_backward", mutates_args=())
def _backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_layout(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    accumulate = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=accumulate, device=value.device)  # atomic adds land here
    grad_locations = _new_output(tuple(sampling_locations.shape), sampling_locations)
    grad_weights = _new_output(tuple(attention_weights.shape), attention_weights)
    if grad_output.numel() != 0:
        grid, arguments = _launch_config(value, sampling_locations)
        with _on_device(value):
            _loaded_kernels().ms_deform_attn_backward_kernel[grid](
                grad_output.contiguous(),
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
                grad_value,
                grad_locations,
                grad_weights,
                **arguments,
            )
    return grad_value.to(value.dtype), grad_locations, grad_weights


_forward.register_fake(custom_ops.forward_fake)
_backward.register_fake(custom_ops.backward_fake)


_forward.register_autograd(custom_ops.backward_through(_backward), setup_context=custom_ops.save_inputs)
