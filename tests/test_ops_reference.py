"""ops.reference, the one float64 reference of the op (the tests and python -m ops.check): known values, the
layout of levels and heads, smooth gradients, and the op's definition at the edges of the map (a pixel coordinate
h or w <= -1 or >= the size touches no pixel and contributes nothing, gradients included)."""

from __future__ import annotations

import math

import pytest
import torch

from ops.reference import reference_ms_deform_attn

HEIGHT, WIDTH = 2, 4
SHAPES = torch.tensor([[HEIGHT, WIDTH]])
STARTS = torch.tensor([0])
JUST = 1 / 16  # a step inside an edge, exact in binary


def pixel(h: int, w: int) -> float:
    """The value at pixel (h, w) of the one-level map of these tests: row 0 holds 1..4, row 1 holds 11..14."""
    return 10.0 * h + w + 1


VALUE = torch.tensor([[pixel(h, w) for h in range(HEIGHT) for w in range(WIDTH)]], dtype=torch.float64)[..., None, None]


def sample(h: float, w: float) -> tuple[float, tuple[float, float], list[torch.Tensor]]:
    """One sample at pixel coordinate (h, w) with attention weight 1 -> (output, its gradient with respect to the
    pixel coordinate as (d/dh, d/dw), the gradients of value, sampling_locations and attention_weights)."""
    value = VALUE.clone().requires_grad_()
    xy = torch.tensor([(w + 0.5) / WIDTH, (h + 0.5) / HEIGHT], dtype=torch.float64)
    location = xy.view(1, 1, 1, 1, 1, 2).requires_grad_()
    weight = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    output = reference_ms_deform_attn(value, SHAPES, STARTS, location, weight)
    assert output.shape == (1, 1, 1) and output.dtype == torch.float64
    grads = list(torch.autograd.grad(output.sum(), [value, location, weight]))
    d_dx, d_dy = grads[1].flatten().tolist()
    return output.item(), (d_dy / HEIGHT, d_dx / WIDTH), grads  # x = (w + 0.5) / W: d/dw = d/dx / W


def test_a_pixel_centre_returns_that_pixel():
    output, _, _ = sample(1, 2)
    assert output == pixel(1, 2)


def test_between_pixels_the_output_is_the_bilinear_mix_and_the_gradient_its_slope():
    output, (d_dh, d_dw), _ = sample(0.25, 1.5)
    # the map is linear (10 per row, 1 per column), so its bilinear interpolation is exact
    assert output == pytest.approx(10 * 0.25 + 1.5 + 1)
    assert (d_dh, d_dw) == pytest.approx((10.0, 1.0))


@pytest.mark.parametrize("h, w", [(-1, 0), (0, -1), (-1, -1), (-1, 1.5), (0.5, -1), (-1, WIDTH - 1)])
def test_at_exactly_minus_one_a_sample_contributes_nothing_gradients_included(h, w):
    output, pixel_gradient, grads = sample(h, w)
    assert output == 0 and pixel_gradient == (0, 0)
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_just_above_minus_one_a_column_reaches_pixel_zero_alone():
    output, (d_dh, d_dw), _ = sample(0, -1 + JUST)
    assert output == pytest.approx(JUST * pixel(0, 0))
    assert d_dw == pytest.approx(pixel(0, 0))  # only the weight of pixel 0 grows with w; pixel -1 is outside
    assert d_dh == pytest.approx(JUST * (pixel(1, 0) - pixel(0, 0)))  # from above on the integer row 0


def test_just_above_minus_one_a_row_reaches_row_zero_alone():
    output, (d_dh, d_dw), _ = sample(-1 + JUST, 0)
    assert output == pytest.approx(JUST * pixel(0, 0))
    assert d_dh == pytest.approx(pixel(0, 0))
    assert d_dw == pytest.approx(JUST * (pixel(0, 1) - pixel(0, 0)))


@pytest.mark.parametrize("h, w", [(0, WIDTH), (HEIGHT, 0), (HEIGHT, WIDTH), (0.5, WIDTH), (HEIGHT, 1.5)])
def test_at_exactly_the_size_a_sample_contributes_nothing_gradients_included(h, w):
    output, pixel_gradient, grads = sample(h, w)
    assert output == 0 and pixel_gradient == (0, 0)
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_just_below_the_width_a_column_reaches_the_last_pixel_alone():
    output, (d_dh, d_dw), _ = sample(0, WIDTH - JUST)
    assert output == pytest.approx(JUST * pixel(0, WIDTH - 1))
    assert d_dw == pytest.approx(-pixel(0, WIDTH - 1))
    assert d_dh == pytest.approx(JUST * (pixel(1, WIDTH - 1) - pixel(0, WIDTH - 1)))


def test_just_below_the_height_a_row_reaches_the_last_row_alone():
    output, (d_dh, d_dw), _ = sample(HEIGHT - JUST, 0)
    assert output == pytest.approx(JUST * pixel(HEIGHT - 1, 0))
    assert d_dh == pytest.approx(-pixel(HEIGHT - 1, 0))
    assert d_dw == pytest.approx(JUST * (pixel(HEIGHT - 1, 1) - pixel(HEIGHT - 1, 0)))


def test_a_nan_location_contributes_nothing_and_its_gradients_are_zero():
    output, pixel_gradient, grads = sample(math.nan, 1)
    assert output == 0 and pixel_gradient == (0, 0)
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_levels_heads_and_channels_land_where_the_op_puts_them():
    """Pixel centres of two levels, two heads, two channels, three points: each output channel m * D + d is the
    weighted sum of value[start of the level + h * W + w, m, d]."""
    level_shapes = [(3, 5), (2, 2)]
    shapes = torch.tensor(level_shapes)
    starts = torch.tensor([0, 15])
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(1, 19, 2, 2, generator=generator, dtype=torch.float64)
    weights = torch.rand(1, 1, 2, 2, 3, generator=generator, dtype=torch.float64)
    locations = torch.zeros(1, 1, 2, 2, 3, 2, dtype=torch.float64)
    expected = torch.zeros(2, 2, dtype=torch.float64)  # (M, D)
    for head in range(2):
        for level, ((height, width), start) in enumerate(zip(level_shapes, starts.tolist())):
            for point in range(3):
                h, w = (point + head) % height, (2 * point + level) % width  # a different pixel each
                centre = [(w + 0.5) / width, (h + 0.5) / height]
                locations[0, 0, head, level, point] = torch.tensor(centre, dtype=torch.float64)
                expected[head] += weights[0, 0, head, level, point] * value[0, start + h * width + w, head]
    output = reference_ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(output, expected.view(1, 1, 4), rtol=1e-12, atol=1e-12)


def test_gradients_agree_with_finite_differences(small_problem):
    """Inside and outside the map and on its borders 0 and 1 (pixel -0.5 and the size - 0.5), where it is smooth."""
    inputs = tuple(small_problem[name].clone().requires_grad_() for name in ("value", "sampling_locations"))
    weights = small_problem["attention_weights"].clone().requires_grad_()
    shapes, starts = small_problem["spatial_shapes"], small_problem["level_start_index"]
    assert torch.autograd.gradcheck(
        lambda value, locations, weights: reference_ms_deform_attn(value, shapes, starts, locations, weights),
        (*inputs, weights),
    )
