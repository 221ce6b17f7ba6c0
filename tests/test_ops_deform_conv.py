"""ops.deform_conv against an independent float64 loop over taps, nn.Conv2d at zero offsets, and gradcheck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ops import record_sampling
from ops.deform_conv import DeformConv2d, deform_conv2d, resolve_backend

F64 = torch.float64


def bilinear_zero_outside(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """image (B, C, H, W) read at pixel (y, x) (B, P, Q): each of the four neighbours outside the map counts 0."""
    batch, channels, height, width = image.shape
    y0, x0 = y.floor(), x.floor()
    result = image.new_zeros(batch, channels, *y.shape[1:])
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            weight = (1 - (y - yy).abs()) * (1 - (x - xx).abs())
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            index = (yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).long().flatten(1)
            values = image.flatten(2).gather(2, index[:, None].expand(-1, channels, -1)).view_as(result)
            result += values * (weight * inside)[:, None]
    return result


def reference_deform_conv(input, offset, weight, bias, stride, padding, dilation, mask):
    """Dai et al. eq. (2) (times the mask of Zhu et al. eq. (1)), tap by tap, offset group by offset group."""
    batch, channels, _, _ = input.shape
    out_channels, group_channels, kh, kw = weight.shape
    taps, out_h, out_w = kh * kw, offset.shape[2], offset.shape[3]
    offset_groups, conv_groups = offset.shape[1] // (2 * taps), channels // group_channels
    per_offset_group, per_conv_group = channels // offset_groups, out_channels // conv_groups
    output = input.new_zeros(batch, out_channels, out_h, out_w)
    rows = torch.arange(out_h, dtype=F64)[:, None] * stride[0] - padding[0]
    cols = torch.arange(out_w, dtype=F64)[None, :] * stride[1] - padding[1]
    for i in range(kh):
        for j in range(kw):
            tap = i * kw + j
            sampled = []
            for g in range(offset_groups):
                dy, dx = offset[:, 2 * (g * taps + tap)], offset[:, 2 * (g * taps + tap) + 1]
                part = input[:, g * per_offset_group : (g + 1) * per_offset_group]
                values = bilinear_zero_outside(part, rows + i * dilation[0] + dy, cols + j * dilation[1] + dx)
                if mask is not None:
                    values = values * mask[:, g * taps + tap][:, None]
                sampled.append(values)
            sampled = torch.cat(sampled, 1)
            for c in range(conv_groups):
                kernel = weight[c * per_conv_group : (c + 1) * per_conv_group, :, i, j]
                group_in = sampled[:, c * group_channels : (c + 1) * group_channels]
                output[:, c * per_conv_group : (c + 1) * per_conv_group] += torch.einsum(
                    "oc,bchw->bohw", kernel, group_in
                )
    return output if bias is None else output + bias[:, None, None]


# (channels, out, groups, offset_groups, stride, padding, dilation)
CASES = [(4, 6, 1, 1, (1, 1), (1, 1), (1, 1)), (6, 4, 2, 3, (2, 1), (0, 2), (1, 2))]


def make_problem(case, modulated: bool, seed: int = 0, size=(7, 6)):
    channels, out, groups, offset_groups, stride, padding, dilation = case
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(2, channels, *size, generator=generator, dtype=F64)
    weight = torch.randn(out, channels // groups, 3, 3, generator=generator, dtype=F64)
    bias = torch.randn(out, generator=generator, dtype=F64)
    out_h = (size[0] + 2 * padding[0] - 2 * dilation[0] - 1) // stride[0] + 1
    out_w = (size[1] + 2 * padding[1] - 2 * dilation[1] - 1) // stride[1] + 1
    # offsets of up to 4 pixels: many taps leave the map
    offset = (torch.rand(2, 2 * offset_groups * 9, out_h, out_w, generator=generator, dtype=F64) - 0.5) * 8
    mask = torch.rand(2, offset_groups * 9, out_h, out_w, generator=generator, dtype=F64) if modulated else None
    return input, offset, weight, bias, mask, {"stride": stride, "padding": padding, "dilation": dilation}


@pytest.mark.parametrize("backend", ["torchvision", "pytorch", "auto"])
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_deform_conv2d_matches_float64_reference(case, modulated, backend):
    input, offset, weight, bias, mask, geometry = make_problem(case, modulated)
    expected = reference_deform_conv(input, offset, weight, bias, mask=mask, **geometry)
    actual = deform_conv2d(input, offset, weight, bias, mask=mask, backend=backend, **geometry)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_auto_backend_takes_grid_sample_for_cpu_training_and_torchvision_otherwise():
    input, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    assert resolve_backend(input, None, weight) == "torchvision"
    weight.requires_grad_()
    assert resolve_backend(input, None, weight) == "pytorch"
    with torch.no_grad():
        assert resolve_backend(input, None, weight) == "torchvision"


@pytest.mark.parametrize("backend", ["torchvision", "pytorch"])
def test_offset_layout_is_dy_then_dx_per_tap(backend):
    """A 1x1 identity kernel: offset channel 0 moves the read one row down, channel 1 one column right."""
    input = torch.arange(20, dtype=F64).view(1, 1, 4, 5)
    identity = torch.ones(1, 1, 1, 1, dtype=F64)
    down, right = torch.zeros(1, 2, 4, 5, dtype=F64), torch.zeros(1, 2, 4, 5, dtype=F64)
    down[:, 0], right[:, 1] = 1.0, 1.0
    below = deform_conv2d(input, down, identity, backend=backend)
    beside = deform_conv2d(input, right, identity, backend=backend)
    torch.testing.assert_close(below[0, 0], torch.cat([input[0, 0, 1:], torch.zeros(1, 5, dtype=F64)]))
    torch.testing.assert_close(beside[0, 0], torch.cat([input[0, 0, :, 1:], torch.zeros(4, 1, dtype=F64)], 1))


def test_offsets_outside_the_map_read_zero():
    input = torch.randn(1, 2, 5, 5, dtype=F64)
    offset = torch.full((1, 18, 5, 5), 100.0, dtype=F64)
    output = deform_conv2d(input, offset, torch.randn(3, 2, 3, 3, dtype=F64), padding=1)
    assert output.abs().max() == 0


@pytest.mark.parametrize("backend", ["torchvision", "pytorch"])
@pytest.mark.parametrize("case", CASES)
def test_zero_offsets_and_unit_mask_equal_conv2d(case, backend):
    input, offset, weight, bias, _, geometry = make_problem(case, modulated=False)
    conv = nn.functional.conv2d(input, weight, bias, groups=input.shape[1] // weight.shape[1], **geometry)
    taps = offset.shape[1] // 2
    mask = torch.ones(offset.shape[0], taps, *offset.shape[2:], dtype=F64)
    for given_mask in (None, mask):
        actual = deform_conv2d(
            input, torch.zeros_like(offset), weight, bias, mask=given_mask, backend=backend, **geometry
        )
        torch.testing.assert_close(actual, conv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torchvision", "pytorch"])
@pytest.mark.parametrize("modulated", [False, True])
def test_gradcheck_every_input(modulated, backend):
    input, offset, weight, bias, mask, geometry = make_problem(CASES[1], modulated, size=(5, 5))
    inputs = [tensor.requires_grad_() for tensor in (input, offset, weight, bias, mask) if tensor is not None]

    def function(input, offset, weight, bias, mask=None):
        return deform_conv2d(input, offset, weight, bias, mask=mask, backend=backend, **geometry)

    assert torch.autograd.gradcheck(function, inputs, fast_mode=True)


@pytest.mark.parametrize("modulated", [False, True])
def test_module_starts_as_plain_convolution(modulated):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    deform = DeformConv2d.from_conv(conv, offset_groups=2, modulated=modulated)
    assert deform.conv_offset.out_channels == (3 if modulated else 2) * 2 * 9
    features = torch.randn(2, 4, 9, 8)
    with record_sampling(deform) as records:
        output = deform(features)
    offset, mask = records[""][0].offset, records[""][0].mask
    assert offset.abs().max() == 0
    scale = 0.5 if modulated else 1.0  # v2's masks start at sigmoid(0)
    expected = nn.functional.conv2d(features, conv.weight * scale, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    assert (mask is None) == (not modulated)


def test_module_learns_offsets():
    deform = DeformConv2d(3, 2, 3, padding=1, modulated=True)
    deform(torch.randn(1, 3, 6, 6)).square().sum().backward()
    assert deform.conv_offset.weight.grad.abs().max() > 0


def test_state_dict_keys_hold_the_convolution_names():
    assert set(DeformConv2d(3, 2, 3, modulated=True).state_dict()) == {
        "weight",
        "bias",
        "conv_offset.weight",
        "conv_offset.bias",
    }


@pytest.mark.parametrize(
    "offset_shape, mask_shape, message",
    [
        ((1, 17, 4, 4), None, "offset must be"),
        ((1, 18, 5, 4), None, "offset must be"),
        ((1, 18, 4, 4), (1, 8, 4, 4), "mask must be"),
    ],
)
def test_wrong_shapes_name_the_argument(offset_shape, mask_shape, message):
    mask = None if mask_shape is None else torch.rand(mask_shape)
    with pytest.raises(ValueError, match=message):
        deform_conv2d(torch.randn(1, 2, 6, 6), torch.zeros(offset_shape), torch.randn(3, 2, 3, 3), mask=mask)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        deform_conv2d(torch.randn(1, 2, 5, 5), torch.zeros(1, 18, 3, 3), torch.randn(3, 2, 3, 3), backend="cuda")
