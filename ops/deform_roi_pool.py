"""Deformable RoI pooling (Dai et al., ICCV 2017), its position-sensitive variant (R-FCN) and modulated v2.

Each RoI is cut into ``kh x kw`` bins; bin (i, j) is moved by ``gamma * (dx_hat * roi_w, dy_hat * roi_h)`` and
averages ``sampling_ratio x sampling_ratio`` bilinear samples inside it (adaptive, ``ceil(roi_size / k)`` per
side, when ``sampling_ratio <= 0``), times the bin's modulation ``mask`` in v2. With zero offsets (and masks of
one) the ops equal ``torchvision.ops.roi_align`` and ``torchvision.ops.ps_roi_align``, whose sampling conventions
they share: box corners times ``spatial_scale``, minus half a pixel when ``aligned`` (always for the PS variant);
RoIs at least one pixel wide unless ``aligned`` (0.1 pixel for the PS variant); a sample more than one pixel
outside the map reads zero, a sample within that pixel reads the border.

Offset layout: ``offset`` is (K, 2, kh, kw), channel 0 the horizontal shift ``dx_hat`` and channel 1 the vertical
shift ``dy_hat``, as fractions of the RoI's width and height (before ``gamma``); ``mask`` is (K, 1, kh, kw).

A vectorised PyTorch formulation (gathers of the four bilinear neighbours), so it runs on every device and
autograd gives the gradients of the features, the offsets and the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ops.sampling_record import OffsetSampling, RecordsSampling

GAMMA = 0.1  # the papers' offset scale


@dataclass(frozen=True)
class _Sampling:
    """How the RoIs are cut: ``start`` subtracted from the scaled corners, RoI sizes clamped to ``min_size``."""

    start: float
    min_size: float


ROI_ALIGN = _Sampling(start=0.0, min_size=1.0)  # torchvision.ops.roi_align(aligned=False)
ROI_ALIGN_ALIGNED = _Sampling(start=0.5, min_size=0.0)  # roi_align(aligned=True)
PS_ROI_ALIGN = _Sampling(start=0.5, min_size=0.1)  # torchvision.ops.ps_roi_align


def rois_from_boxes(boxes: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Boxes as ``roi_align`` takes them -> (K, 5) rows ``(batch_index, x1, y1, x2, y2)``.

    Args:
        boxes: (K, 5) already, or a list with one (L_i, 4) tensor of ``x1, y1, x2, y2`` per image.
    """
    if isinstance(boxes, (list, tuple)):
        for index, image_boxes in enumerate(boxes):
            if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
                raise ValueError(f"boxes[{index}] must be (L, 4) x1, y1, x2, y2, got {tuple(image_boxes.shape)}")
        if not boxes:
            raise ValueError("boxes is an empty list: give one (L, 4) tensor per image")
        indices = [torch.full_like(image_boxes[:, :1], index) for index, image_boxes in enumerate(boxes)]
        return torch.cat([torch.cat(indices), torch.cat(list(boxes))], 1)
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 5:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(
            f"boxes must be a (K, 5) tensor (batch_index, x1, y1, x2, y2) or a list of (L, 4), got {shape}"
        )
    return boxes


def deformed_bins(
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    gamma: float,
    sampling: _Sampling = ROI_ALIGN,
) -> torch.Tensor:
    """Each bin's corners after the offsets, in feature-map pixels: (K, kh, kw, 4) ``x1, y1, x2, y2``.

    Args:
        rois: (K, 5) ``batch_index, x1, y1, x2, y2`` in image pixels.
        offset: (K, 2, kh, kw) ``(dx_hat, dy_hat)`` or None for no offsets.
    """
    kh, kw = output_size
    start = rois[:, 1:] * spatial_scale - sampling.start  # (K, 4)
    width = (start[:, 2] - start[:, 0]).clamp(min=sampling.min_size)
    height = (start[:, 3] - start[:, 1]).clamp(min=sampling.min_size)
    bin_w, bin_h = width / kw, height / kh
    cols = torch.arange(kw, device=rois.device, dtype=rois.dtype)
    rows = torch.arange(kh, device=rois.device, dtype=rois.dtype)
    x1 = (start[:, 0, None] + cols * bin_w[:, None])[:, None, :].expand(-1, kh, -1)  # (K, kh, kw)
    y1 = (start[:, 1, None] + rows * bin_h[:, None])[:, :, None].expand(-1, -1, kw)
    if offset is not None:
        x1 = x1 + gamma * offset[:, 0] * width[:, None, None]
        y1 = y1 + gamma * offset[:, 1] * height[:, None, None]
    return torch.stack((x1, y1, x1 + bin_w[:, None, None], y1 + bin_h[:, None, None]), -1)


def _bilinear_gather(table: torch.Tensor, base: torch.Tensor, y: torch.Tensor, x: torch.Tensor, size) -> torch.Tensor:
    """``roi_align``'s bilinear read of rows ``base + y * W + x`` of ``table`` (rows, C) -> (*y.shape, C)."""
    height, width = size
    outside = (y < -1) | (y > height) | (x < -1) | (x > width)
    y = y.clamp(min=0, max=height - 1)
    x = x.clamp(min=0, max=width - 1)
    y_low, x_low = y.detach().floor(), x.detach().floor()
    ly, lx = y - y_low, x - x_low
    y_low, x_low = y_low.long(), x_low.long()
    y_high, x_high = (y_low + 1).clamp(max=height - 1), (x_low + 1).clamp(max=width - 1)
    result = 0
    for rows, cols, weight in (
        (y_low, x_low, (1 - ly) * (1 - lx)),
        (y_low, x_high, (1 - ly) * lx),
        (y_high, x_low, ly * (1 - lx)),
        (y_high, x_high, ly * lx),
    ):
        index = (base + rows * width + cols).reshape(-1)
        values = table.index_select(0, index).view(*y.shape, table.shape[1])
        result = result + values * (weight * ~outside)[..., None]
    return result


def _pool(
    input: torch.Tensor,
    boxes: torch.Tensor | list[torch.Tensor],
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    sampling: _Sampling,
    position_sensitive: bool,
) -> torch.Tensor:
    """The shared body of :func:`deform_roi_pool` and :func:`deform_ps_roi_pool`."""
    kh, kw = _pair(output_size)
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), got {tuple(input.shape)}")
    batch, channels, height, width = input.shape
    bin_groups = kh * kw if position_sensitive else 1
    if channels % bin_groups:
        raise ValueError(f"input has {channels} channels; position-sensitive pooling needs a multiple of {kh}*{kw}")
    rois = rois_from_boxes(boxes).to(input.dtype)
    count = rois.shape[0]
    for name, tensor, size in (("offset", offset, 2), ("mask", mask, 1)):
        if tensor is not None and tuple(tensor.shape) != (count, size, kh, kw):
            raise ValueError(f"{name} must be (K={count}, {size}, {kh}, {kw}), got {tuple(tensor.shape)}")
    out_channels = channels // bin_groups
    if count == 0:
        return input.new_zeros(0, out_channels, kh, kw)
    bins = deformed_bins(rois, offset, (kh, kw), spatial_scale, gamma, sampling)  # (K, kh, kw, 4)
    bin_w, bin_h = (bins[..., 2] - bins[..., 0]).detach(), (bins[..., 3] - bins[..., 1]).detach()
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((count,), sampling_ratio, device=input.device)
    else:  # adaptive: ceil(roi size / bins), per RoI
        grid_h, grid_w = torch.ceil(bin_h[:, 0, 0]).long(), torch.ceil(bin_w[:, 0, 0]).long()
    steps_h, steps_w = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    iy = torch.arange(steps_h, device=input.device)
    ix = torch.arange(steps_w, device=input.device)
    # sample (a, b) of bin (i, j): (K, kh, kw, steps_h, 1) rows and (K, kh, kw, 1, steps_w) columns
    grid_h_, grid_w_ = grid_h.to(input.dtype)[:, None, None, None], grid_w.to(input.dtype)[:, None, None, None]
    y = bins[..., 1, None] + (iy + 0.5) * bin_h[..., None] / grid_h_
    x = bins[..., 0, None] + (ix + 0.5) * bin_w[..., None] / grid_w_
    y, x = y[..., :, None].expand(-1, -1, -1, -1, steps_w), x[..., None, :].expand(-1, -1, -1, steps_h, -1)
    valid = (iy[:, None] < grid_h[:, None, None]) & (ix[None, :] < grid_w[:, None, None])  # (K, steps_h, steps_w)
    weights = valid.to(input.dtype) / (grid_h * grid_w).clamp(min=1).to(input.dtype)[:, None, None]
    # table rows: (image, bin group, row, column) -> C / bin_groups channels
    table = input.view(batch, out_channels, bin_groups, height, width).permute(0, 2, 3, 4, 1)
    table = table.reshape(-1, out_channels)
    bin_index = torch.arange(kh * kw, device=input.device).view(kh, kw) if position_sensitive else 0
    base = ((rois[:, 0].long()[:, None, None] * bin_groups + bin_index) * height * width)[..., None, None]
    samples = _bilinear_gather(table, base, y, x, (height, width))  # (K, kh, kw, steps_h, steps_w, C')
    pooled = torch.einsum("kijabc,kab->kcij", samples, weights)
    return pooled if mask is None else pooled * mask


def deform_roi_pool(
    input: torch.Tensor,
    boxes: torch.Tensor | list[torch.Tensor],
    offset: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    output_size: int | tuple[int, int] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    gamma: float = GAMMA,
    aligned: bool = False,
) -> torch.Tensor:
    """Deformable RoI pooling (v1; modulated v2 with ``mask``), ``roi_align``-style bilinear sampling.

    Args:
        input: (N, C, H, W).
        boxes: (K, 5) ``batch_index, x1, y1, x2, y2`` or a list of (L_i, 4), image pixels.
        offset: (K, 2, kh, kw) normalised ``(dx_hat, dy_hat)`` or None (plain ``roi_align``).
        mask: (K, 1, kh, kw) modulation or None.
        aligned: as ``roi_align``'s: subtract half a pixel from the scaled box corners.

    Returns:
        (K, C, kh, kw).
    """
    sampling = ROI_ALIGN_ALIGNED if aligned else ROI_ALIGN
    return _pool(input, boxes, offset, mask, output_size, spatial_scale, sampling_ratio, gamma, sampling, False)


def deform_ps_roi_pool(
    input: torch.Tensor,
    boxes: torch.Tensor | list[torch.Tensor],
    offset: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    output_size: int | tuple[int, int] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    gamma: float = GAMMA,
) -> torch.Tensor:
    """Deformable position-sensitive RoI pooling (R-FCN), ``ps_roi_align``-style sampling: output channel c of bin
    (i, j) averages input channel ``(c * kh + i) * kw + j``.

    Args as :func:`deform_roi_pool`; ``input`` is (N, C' * kh * kw, H, W). Returns (K, C', kh, kw).
    """
    return _pool(input, boxes, offset, mask, output_size, spatial_scale, sampling_ratio, gamma, PS_ROI_ALIGN, True)


class DeformRoIPool(RecordsSampling, nn.Module):
    """Deformable RoI pooling with its offset predictor: one fc layer (zero at the start) on the plain pooled
    features predicts ``(dx_hat, dy_hat)`` per bin (and a modulation logit per bin when ``modulated``).

    Forward: input (N, C, H, W), boxes as :func:`deform_roi_pool` -> (K, C, kh, kw). Within
    :func:`ops.record_sampling` it also records an :class:`ops.OffsetSampling`: the offsets (K, 2, kh, kw) and the
    mask (K, 1, kh, kw) or None.
    """

    def __init__(
        self,
        in_channels: int,
        output_size: int | tuple[int, int] = 7,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        gamma: float = GAMMA,
        modulated: bool = False,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale, self.sampling_ratio, self.gamma = spatial_scale, sampling_ratio, gamma
        self.modulated, self.aligned = modulated, aligned
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = nn.Linear(in_channels * bins, (3 if modulated else 2) * bins)
        nn.init.zeros_(self.offset_fc.weight)
        nn.init.zeros_(self.offset_fc.bias)

    def _pool(self, input, boxes, offset=None, mask=None) -> torch.Tensor:
        return deform_roi_pool(
            input, boxes, offset, mask, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma,
            self.aligned,
        )  # fmt: skip

    def forward(self, input: torch.Tensor, boxes: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        plain = self._pool(input, boxes)
        offset, mask = _split_prediction(self.offset_fc(plain.flatten(1)), self.output_size, self.modulated)
        if self.sampling_recorder is not None:
            self.sampling_recorder(OffsetSampling(offset, mask, tuple(input.shape[-2:])))
        return self._pool(input, boxes, offset, mask)


class DeformPSRoIPool(RecordsSampling, nn.Module):
    """Deformable position-sensitive RoI pooling with its offset predictor: a 1x1 convolution (zero at the start)
    with ``2 * kh * kw`` channels (3 when ``modulated``) on the input, position-sensitively pooled per RoI into
    ``(dx_hat, dy_hat)`` (and a modulation logit) per bin.

    Forward: input (N, C' * kh * kw, H, W), boxes -> (K, C', kh, kw); recorded as :class:`DeformRoIPool`.
    """

    def __init__(
        self,
        in_channels: int,
        output_size: int | tuple[int, int] = 7,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        gamma: float = GAMMA,
        modulated: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        bins = self.output_size[0] * self.output_size[1]
        if in_channels % bins:
            raise ValueError(f"in_channels={in_channels} must be a multiple of the {bins} bins")
        self.spatial_scale, self.sampling_ratio, self.gamma, self.modulated = (
            spatial_scale,
            sampling_ratio,
            gamma,
            modulated,
        )
        self.offset_conv = nn.Conv2d(in_channels, (3 if modulated else 2) * bins, 1)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def _pool(self, input, boxes, offset=None, mask=None) -> torch.Tensor:
        return deform_ps_roi_pool(
            input, boxes, offset, mask, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma
        )

    def forward(self, input: torch.Tensor, boxes: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        prediction = self._pool(self.offset_conv(input), boxes)  # (K, 2 or 3, kh, kw)
        offset, mask = _split_prediction(prediction.flatten(1), self.output_size, self.modulated)
        if self.sampling_recorder is not None:
            self.sampling_recorder(OffsetSampling(offset, mask, tuple(input.shape[-2:])))
        return self._pool(input, boxes, offset, mask)


def _split_prediction(
    prediction: torch.Tensor, output_size: tuple[int, int], modulated: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(K, 2 or 3 * kh * kw) -> offsets (K, 2, kh, kw) and the sigmoid mask (K, 1, kh, kw) or None."""
    prediction = prediction.view(prediction.shape[0], -1, *output_size)
    return prediction[:, :2], prediction[:, 2:].sigmoid() if modulated else None
