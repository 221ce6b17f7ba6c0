"""ops.deform_roi_pool against an independent float64 loop over RoIs, bins and samples; roi_align / ps_roi_align at
zero offsets; gradcheck; the modules' zero start."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from ops import record_sampling
from ops.deform_roi_pool import DeformPSRoIPool, DeformRoIPool, deform_ps_roi_pool, deform_roi_pool, deformed_bins

F64 = torch.float64


def read(image: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """roi_align's bilinear read of image (C, H, W) at pixel (y, x): 0 beyond one pixel outside, else border-clamped."""
    _, height, width = image.shape
    if y < -1 or y > height or x < -1 or x > width:
        return image.new_zeros(image.shape[0])
    y, x = min(max(y, 0.0), height - 1), min(max(x, 0.0), width - 1)
    y0, x0 = math.floor(y), math.floor(x)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    return (
        image[:, y0, x0] * (1 - ly) * (1 - lx)
        + image[:, y0, x1] * (1 - ly) * lx
        + image[:, y1, x0] * ly * (1 - lx)
        + image[:, y1, x1] * ly * lx
    )


def reference_pool(input, rois, offset, mask, k, scale, ratio, gamma, shift, min_size, position_sensitive):
    """Dai et al. eq. (5)-(6): bin (i, j) of RoI r, moved by gamma * (dx_hat * w, dy_hat * h), averaged samples."""
    channels = input.shape[1] // (k * k) if position_sensitive else input.shape[1]
    output = input.new_zeros(len(rois), channels, k, k)
    for r, (index, *corners) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (value * scale - shift for value in corners)
        width, height = max(x2 - x1, min_size), max(y2 - y1, min_size)
        grid_h = ratio if ratio > 0 else math.ceil(height / k)
        grid_w = ratio if ratio > 0 else math.ceil(width / k)
        for i in range(k):
            for j in range(k):
                top = y1 + i * height / k + (gamma * offset[r, 1, i, j].item() * height if offset is not None else 0)
                left = x1 + j * width / k + (gamma * offset[r, 0, i, j].item() * width if offset is not None else 0)
                group = (torch.arange(channels) * k * k + i * k + j) if position_sensitive else torch.arange(channels)
                image = input[int(index), group]
                total = sum(
                    read(image, top + (a + 0.5) * height / k / grid_h, left + (b + 0.5) * width / k / grid_w)
                    for a in range(grid_h)
                    for b in range(grid_w)
                )
                output[r, :, i, j] = total / max(grid_h * grid_w, 1) * (mask[r, 0, i, j] if mask is not None else 1)
    return output


def make_problem(position_sensitive: bool, k: int = 2, seed: int = 0, channels: int = 3):
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(2, channels * (k * k if position_sensitive else 1), 9, 8, generator=generator, dtype=F64)
    rois = torch.tensor(
        [[0, 1.0, 2.0, 11.0, 15.0], [1, -4.0, -3.0, 6.0, 5.0], [1, 9.0, 10.0, 30.0, 24.0], [0, 3.0, 3.0, 3.4, 3.2]],
        dtype=F64,
    )
    # offsets of up to 8 RoI sizes times gamma 0.1: bins leave the map
    offset = (torch.rand(4, 2, k, k, generator=generator, dtype=F64) - 0.5) * 16
    mask = torch.rand(4, 1, k, k, generator=generator, dtype=F64)
    return input, rois, offset, mask


# (ratio, scale, aligned)
SAMPLINGS = [(2, 1.0, False), (-1, 0.5, True), (-1, 0.75, False)]


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("ratio, scale, aligned", SAMPLINGS)
def test_deform_roi_pool_matches_float64_reference(ratio, scale, aligned, modulated):
    input, rois, offset, mask = make_problem(position_sensitive=False)
    mask = mask if modulated else None
    actual = deform_roi_pool(input, rois, offset, mask, 2, scale, ratio, 0.1, aligned)
    shift, min_size = (0.5, 0.0) if aligned else (0.0, 1.0)
    expected = reference_pool(input, rois, offset, mask, 2, scale, ratio, 0.1, shift, min_size, False)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("ratio, scale", [(2, 1.0), (-1, 0.5)])
def test_deform_ps_roi_pool_matches_float64_reference(ratio, scale, modulated):
    input, rois, offset, mask = make_problem(position_sensitive=True)
    mask = mask if modulated else None
    actual = deform_ps_roi_pool(input, rois, offset, mask, 2, scale, ratio, 0.1)
    expected = reference_pool(input, rois, offset, mask, 2, scale, ratio, 0.1, 0.5, 0.1, True)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ratio, scale, aligned", SAMPLINGS)
def test_zero_offsets_equal_roi_align(ratio, scale, aligned):
    input, rois, offset, mask = make_problem(position_sensitive=False, k=3)
    expected = torchvision.ops.roi_align(input, rois, 3, scale, ratio, aligned)
    for zero_offset, unit_mask in ((None, None), (torch.zeros_like(offset), torch.ones_like(mask))):
        actual = deform_roi_pool(input, rois, zero_offset, unit_mask, 3, scale, ratio, aligned=aligned)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ratio, scale", [(2, 1.0), (-1, 0.5)])
def test_zero_offsets_equal_ps_roi_align(ratio, scale):
    input, rois, offset, mask = make_problem(position_sensitive=True, k=3)
    expected = torchvision.ops.ps_roi_align(input, rois, 3, scale, ratio)
    actual = deform_ps_roi_pool(input, rois, torch.zeros_like(offset), torch.ones_like(mask), 3, scale, ratio)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_boxes_as_a_list_per_image_equal_the_k_by_5_form():
    input, rois, offset, _ = make_problem(position_sensitive=False)
    order = torch.tensor([0, 3, 1, 2])  # image 0's boxes first, as the list gives them
    as_list = [rois[rois[:, 0] == index, 1:] for index in (0, 1)]
    expected = deform_roi_pool(input, rois[order], offset[order], output_size=2)
    torch.testing.assert_close(deform_roi_pool(input, as_list, offset[order], output_size=2), expected)


@pytest.mark.parametrize("position_sensitive", [False, True])
def test_gradcheck_features_offsets_and_masks(position_sensitive):
    input, rois, offset, mask = make_problem(position_sensitive, channels=2)
    pool = deform_ps_roi_pool if position_sensitive else deform_roi_pool

    def function(input, offset, mask):
        return pool(input, rois, offset, mask, output_size=2, spatial_scale=0.5, sampling_ratio=-1)

    inputs = [tensor.requires_grad_() for tensor in (input, offset, mask)]
    assert torch.autograd.gradcheck(function, inputs, fast_mode=True)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("module_class", [DeformRoIPool, DeformPSRoIPool])
def test_modules_start_as_plain_pooling_and_learn_offsets(module_class, modulated):
    position_sensitive = module_class is DeformPSRoIPool
    input, rois, _, _ = make_problem(position_sensitive)
    input = input.float()
    module = module_class(input.shape[1], output_size=2, spatial_scale=0.5, sampling_ratio=2, modulated=modulated)
    with record_sampling(module) as records:
        output = module(input, rois.float())
    offset, mask = records[""][0].offset, records[""][0].mask
    plain = (torchvision.ops.ps_roi_align if position_sensitive else torchvision.ops.roi_align)(
        input, rois.float(), 2, 0.5, 2
    )
    torch.testing.assert_close(output, plain * (0.5 if modulated else 1.0))
    assert offset.shape == (4, 2, 2, 2) and offset.abs().max() == 0
    assert (mask is None) == (not modulated)
    output.square().sum().backward()
    predictor = module.offset_conv if position_sensitive else module.offset_fc
    assert predictor.weight.grad.abs().max() > 0


def test_deformed_bins_move_by_gamma_times_the_roi_size():
    rois = torch.tensor([[0, 10.0, 20.0, 50.0, 40.0]])  # 40 wide, 20 high
    offset = torch.zeros(1, 2, 2, 2)
    offset[0, 0, 1, 0], offset[0, 1, 1, 0] = 1.0, -1.0
    bins = deformed_bins(rois, offset, (2, 2), spatial_scale=1.0, gamma=0.1)
    assert bins[0, 0, 0].tolist() == [10.0, 20.0, 30.0, 30.0]
    assert bins[0, 1, 0].tolist() == [14.0, 28.0, 34.0, 38.0]  # x + 0.1 * 40, y - 0.1 * 20


def test_no_boxes_give_an_empty_output():
    assert deform_roi_pool(torch.randn(1, 3, 5, 5), torch.zeros(0, 5), output_size=2).shape == (0, 3, 2, 2)


@pytest.mark.parametrize(
    "boxes, offset_shape, message",
    [(torch.zeros(2, 4), None, "boxes must be"), (torch.zeros(2, 5), (2, 2, 3, 3), "offset must be")],
)
def test_wrong_shapes_name_the_argument(boxes, offset_shape, message):
    offset = None if offset_shape is None else torch.zeros(offset_shape)
    with pytest.raises(ValueError, match=message):
        deform_roi_pool(torch.randn(1, 3, 5, 5), boxes, offset, output_size=2)


def test_position_sensitive_pooling_needs_channels_per_bin():
    with pytest.raises(ValueError, match="multiple of 2\\*2"):
        deform_ps_roi_pool(torch.randn(1, 6, 5, 5), torch.zeros(1, 5), output_size=2)
