"""Deformable convolution, v1 (Dai et al., ICCV 2017) and modulated v2 (Zhu et al., CVPR 2019).

Output position p of a k x k convolution reads its tap t at ``p * stride - padding + t * dilation + offset[t](p)``,
bilinearly, zero outside the map, times ``mask[t](p)`` in v2:

    y(p) = sum_t w_t * x(p0 + p_t + dp_t) * m_t

Offset layout (torchvision's): ``offset`` is ``(B, 2 * G * kh * kw, H_out, W_out)`` with channel
``2 * (g * kh * kw + i * kw + j)`` the row shift ``dy`` and the next one the column shift ``dx`` of tap ``(i, j)``
for offset group ``g``; offset group ``g`` deforms input channels ``[g * C / G, (g + 1) * C / G)``. ``mask`` is
``(B, G * kh * kw, H_out, W_out)``, channel ``g * kh * kw + i * kw + j``.

Two backends: ``"torchvision"`` (``torchvision.ops.deform_conv2d``: compiled CPU and CUDA kernels) and
``"pytorch"`` (a ``grid_sample`` im2col followed by one matrix product; runs and exports anywhere). ``"auto"``
(default) takes ``"pytorch"`` on the CPU when gradients are needed (torchvision's CPU backward is 3x slower than
the ``grid_sample`` formulation's at a ResNet conv4 shape and the slowest op of a DCN backbone's training step;
benchmarks/RESULTS.md) and ``"torchvision"`` otherwise (its forward is the faster one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.utils import _pair

from ops.sampling_record import OffsetSampling, RecordsSampling

BACKENDS = ("auto", "torchvision", "pytorch")


def output_size(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:  # fmt: skip
    """(H_out, W_out) of a convolution, as ``nn.Conv2d``."""
    return tuple(  # type: ignore[return-value]
        (size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(2)
    )


def _check_inputs(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    out_size: tuple[int, int],
) -> int:
    """The number of offset groups; a ValueError naming the argument whose shape disagrees."""
    if input.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"input, offset and weight must be 4-d, got {input.dim()}, {offset.dim()} and {weight.dim()} dimensions"
        )
    batch, channels = input.shape[:2]
    taps = weight.shape[2] * weight.shape[3]
    if channels % weight.shape[1]:
        raise ValueError(f"input has {channels} channels, not a multiple of weight's {weight.shape[1]} per group")
    if out_size[0] <= 0 or out_size[1] <= 0:
        raise ValueError(f"input {tuple(input.shape[-2:])} is too small for the kernel: output size {out_size}")
    if offset.shape[0] != batch or tuple(offset.shape[-2:]) != out_size or offset.shape[1] % (2 * taps):
        raise ValueError(
            f"offset must be (B={batch}, 2 * offset_groups * {taps}, {out_size[0]}, {out_size[1]}), "
            f"got {tuple(offset.shape)}"
        )
    groups = offset.shape[1] // (2 * taps)
    if channels % groups:
        raise ValueError(f"offset has {groups} offset groups, which do not divide the input's {channels} channels")
    if mask is not None and tuple(mask.shape) != (batch, groups * taps, *out_size):
        raise ValueError(
            f"mask must be (B={batch}, offset_groups * {taps}={groups * taps}, {out_size[0]}, {out_size[1]}), "
            f"got {tuple(mask.shape)}"
        )
    return groups


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable convolution; v2 (modulated) when ``mask`` is given.

    Args:
        input: (B, C, H, W).
        offset: (B, 2 * G * kh * kw, H_out, W_out), (dy, dx) per tap, in input pixels (see the module docstring).
        weight: (O, C / groups, kh, kw); ``groups`` is ``C // weight.shape[1]``.
        bias: (O,) or None.
        mask: (B, G * kh * kw, H_out, W_out) or None (v1).
        backend: ``"torchvision"`` (compiled kernels), ``"pytorch"`` (``grid_sample``) or ``"auto"``
            (:func:`resolve_backend`).

    Returns:
        (B, O, H_out, W_out).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out_size = output_size(tuple(input.shape[-2:]), tuple(weight.shape[-2:]), stride, padding, dilation)
    _check_inputs(input, offset, weight, mask, out_size)
    if backend == "auto":
        backend = resolve_backend(input, offset, weight, bias, mask)
    if backend == "torchvision":
        if input.dtype == torch.bfloat16 and input.device.type == "cpu":  # torchvision has no such CPU kernel
            floats = [tensor.float() if tensor is not None else None for tensor in (input, offset, weight, bias, mask)]
            return deform_conv2d(*floats[:4], stride, padding, dilation, floats[4], backend).to(input.dtype)
        return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    if backend == "pytorch":
        return _deform_conv2d_grid_sample(input, offset, weight, bias, stride, padding, dilation, mask)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(*tensors: torch.Tensor | None) -> str:
    """``"auto"``: ``"pytorch"`` on the CPU when autograd will need gradients of any of ``tensors``, else
    ``"torchvision"``."""
    present = [tensor for tensor in tensors if tensor is not None]
    needs_grad = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in present)
    return "pytorch" if needs_grad and present[0].device.type == "cpu" else "torchvision"


def _deform_conv2d_grid_sample(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The same convolution as ``grid_sample`` (one call for every tap) and one batched matrix product."""
    batch, channels, height, width = input.shape
    out_channels, group_channels, kh, kw = weight.shape
    taps, (out_h, out_w) = kh * kw, offset.shape[-2:]
    groups = offset.shape[1] // (2 * taps)
    # pixel (row, column) of every tap at every output position, before the offsets: (taps, H_out, W_out)
    rows = torch.arange(out_h, device=input.device, dtype=input.dtype) * stride[0] - padding[0]
    cols = torch.arange(out_w, device=input.device, dtype=input.dtype) * stride[1] - padding[1]
    tap_rows = torch.arange(kh, device=input.device, dtype=input.dtype).repeat_interleave(kw) * dilation[0]
    tap_cols = torch.arange(kw, device=input.device, dtype=input.dtype).repeat(kh) * dilation[1]
    offset = offset.reshape(batch * groups, taps, 2, out_h, out_w)
    y = tap_rows[:, None, None] + rows[None, :, None] + offset[:, :, 0]  # (B * G, taps, H_out, W_out)
    x = tap_cols[:, None, None] + cols[None, None, :] + offset[:, :, 1]
    # grid_sample(align_corners=False) reads pixel p at normalised (2 p + 1) / size - 1; zeros outside
    grid = torch.stack(((2 * x + 1) / width - 1, (2 * y + 1) / height - 1), -1).view(batch * groups, taps, -1, 2)
    grouped = input.reshape(batch * groups, channels // groups, height, width)
    columns = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mask is not None:  # (B * G, C / G, taps, H_out * W_out) times (B * G, 1, taps, H_out * W_out)
        columns = columns * mask.reshape(batch * groups, 1, taps, -1)
    conv_groups = channels // group_channels
    columns = columns.reshape(batch, conv_groups, group_channels * taps, out_h * out_w)
    kernels = weight.reshape(conv_groups, out_channels // conv_groups, group_channels * taps)
    output = torch.einsum("gok,bgkl->bgol", kernels, columns).reshape(batch, out_channels, out_h, out_w)
    return output if bias is None else output + bias[:, None, None]


class DeformConv2d(RecordsSampling, nn.Module):
    """A deformable convolution with its own offset (and, ``modulated``, mask) predictor.

    ``weight`` and ``bias`` are named and shaped as ``nn.Conv2d``'s, so a plain convolution's weights load into it.
    The predictor ``conv_offset`` is a plain convolution on the same input with the same kernel size, stride,
    padding and dilation, with ``3 * G * k * k`` output channels for v2 (offsets, then mask logits) and
    ``2 * G * k * k`` for v1; it starts at zero, so training starts from a plain convolution (v1) or a plain one
    at half strength (v2, ``sigmoid(0) = 0.5``).

    Args as ``nn.Conv2d``; ``offset_groups`` (G) input channel groups with their own offsets; ``modulated``: v2.

    Forward: (B, C, H, W) -> (B, O, H_out, W_out). Within :func:`ops.record_sampling` it also records an
    :class:`ops.OffsetSampling`: the offsets (B, 2 G k k, H_out, W_out) and the mask (B, G k k, H_out, W_out) or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value, divides in (("groups", groups, out_channels), ("offset_groups", offset_groups, None)):
            if value <= 0 or in_channels % value or (divides is not None and divides % value):
                raise ValueError(f"{name}={value} must divide in_channels={in_channels} (and out_channels)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.offset_groups, self.modulated, self.backend = groups, offset_groups, modulated, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = offset_groups * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(
            in_channels, (3 if modulated else 2) * taps, self.kernel_size, self.stride, self.padding, self.dilation
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` and ``bias`` as ``nn.Conv2d`` initialises them; the predictor at zero."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, offset_groups: int = 1, modulated: bool = False) -> DeformConv2d:
        """A deformable convolution with ``conv``'s hyper-parameters and a copy of its weights."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"from_conv needs numeric zero padding, got {conv.padding!r} ({conv.padding_mode})")
        deform = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, offset_groups, conv.bias is not None, modulated,
        )  # fmt: skip
        deform.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            deform.weight.copy_(conv.weight)
            if conv.bias is not None:
                deform.bias.copy_(conv.bias)
        return deform

    def predict_sampling(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) -> offsets (B, 2 G k k, H_out, W_out), mask (B, G k k, H_out, W_out) in [0, 1] or None."""
        prediction = self.conv_offset(features)
        if not self.modulated:
            return prediction, None
        taps = prediction.shape[1] // 3
        return prediction[:, : 2 * taps], prediction[:, 2 * taps :].sigmoid()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        offset, mask = self.predict_sampling(features)
        if self.sampling_recorder is not None:
            self.sampling_recorder(OffsetSampling(offset, mask, tuple(features.shape[-2:])))
        return deform_conv2d(
            features, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask, self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"offset_groups={self.offset_groups}, modulated={self.modulated}"
        )
