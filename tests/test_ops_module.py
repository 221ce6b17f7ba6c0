"""MSDeformAttn: shapes, padding mask, initial sampling pattern, box references, checkpoint names (where it samples
is read through ops.record_sampling, tested in test_ops_sampling_record.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ops import MSDeformAttn, record_sampling

LEVEL_SHAPES = [(6, 8), (3, 4), (2, 2)]


def _inputs(batch=2, queries=5, d_model=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVEL_SHAPES)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    positions = int(areas.sum())
    return {
        "query": torch.randn(batch, queries, d_model, generator=generator),
        "reference_points": torch.rand(batch, queries, len(LEVEL_SHAPES), 2, generator=generator),
        "input_flatten": torch.randn(batch, positions, d_model, generator=generator),
        "input_spatial_shapes": shapes,
        "input_level_start_index": starts,
    }


def _module(backend="cpu", d_model=16, heads=4, points=3):
    torch.manual_seed(0)
    module = MSDeformAttn(d_model, len(LEVEL_SHAPES), heads, points, backend=backend)
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)  # make offsets depend on the query
    torch.nn.init.normal_(module.attention_weights.weight, std=0.1)
    return module


def _sampled(module: MSDeformAttn, **inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's output and where it sampled: sampling_locations, attention_weights."""
    with record_sampling(module) as records:
        output = module(**inputs)
    (sampling,) = records[""]
    return output, sampling.sampling_locations, sampling.attention_weights


def test_output_and_sampling_shapes():
    inputs = _inputs()
    output, locations, weights = _sampled(_module(), **inputs)
    assert output.shape == (2, 5, 16)
    assert locations.shape == (2, 5, 4, 3, 3, 2)
    assert weights.shape == (2, 5, 4, 3, 3)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 5, 4))


def test_backends_agree_in_the_module():
    inputs = _inputs()
    expected = _module("pytorch")(**inputs)
    torch.testing.assert_close(_module("cpu")(**inputs), expected, rtol=1e-5, atol=1e-5)


def test_padding_mask_hides_padded_values():
    inputs = _inputs()
    mask = torch.zeros(2, inputs["input_flatten"].shape[1], dtype=torch.bool)
    mask[0, 10:30] = True
    mask[1, 40:] = True
    module = _module()
    output = module(**inputs, input_padding_mask=mask)
    changed = dict(inputs, input_flatten=inputs["input_flatten"].masked_fill(mask[..., None], 123.0))
    torch.testing.assert_close(module(**changed, input_padding_mask=mask), output)
    assert not torch.allclose(module(**changed), output)  # without the mask the padding is seen


def test_initial_sampling_pattern_is_a_ring_of_directions_with_uniform_weights():
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=8, n_points=4)
    inputs = _inputs(batch=1, queries=1)
    inputs["query"] = torch.zeros_like(inputs["query"])  # offsets are then the biases alone
    _, locations, weights = _sampled(module, **inputs)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 12))
    widths_heights = torch.tensor(LEVEL_SHAPES).flip(-1).float()  # (L, 2) as (W, H)
    offsets_in_pixels = (locations - inputs["reference_points"][:, :, None, :, None, :]) * widths_heights[:, None]
    for head in range(8):
        angle = 2 * math.pi * head / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for point in range(4):
            expected = direction * (point + 1)
            for level in range(3):
                torch.testing.assert_close(offsets_in_pixels[0, 0, head, level, point], expected, atol=1e-5, rtol=1e-5)
    assert (module.attention_weights.weight == 0).all() and (module.attention_weights.bias == 0).all()


def test_box_references_scale_offsets_by_box_size():
    module = _module()
    inputs = _inputs()
    boxes = torch.cat([inputs["reference_points"], torch.full_like(inputs["reference_points"], 0.2)], -1)
    inputs["reference_points"] = boxes
    _, locations, _ = _sampled(module, **inputs)
    offsets = module.sampling_offsets(inputs["query"]).view(2, 5, 4, 3, 3, 2)
    expected = boxes[:, :, None, :, None, :2] + offsets / 3 * boxes[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(locations, expected)


def test_point_references_offset_in_pixels_of_each_level():
    module = _module()
    inputs = _inputs()
    _, locations, _ = _sampled(module, **inputs)
    offsets = module.sampling_offsets(inputs["query"]).view(2, 5, 4, 3, 3, 2)
    sizes = torch.tensor(LEVEL_SHAPES).flip(-1).float()[None, None, None, :, None, :]
    torch.testing.assert_close(locations, inputs["reference_points"][:, :, None, :, None, :] + offsets / sizes)


def test_gradients_reach_every_parameter():
    module = _module()
    module(**_inputs()).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"d_model": 30, "n_heads": 8}, "d_model \\(30\\) must be divisible by n_heads \\(8\\)"),
        ({"backend": "fast"}, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSDeformAttn(**kwargs)


def test_bad_reference_points_are_rejected():
    inputs = _inputs()
    inputs["reference_points"] = torch.rand(2, 5, 3, 3)
    with pytest.raises(ValueError, match="reference_points must end in 2"):
        _module()(**inputs)
    inputs["reference_points"] = torch.rand(2, 5, 2, 2)
    with pytest.raises(ValueError, match="reference_points must be \\(N, Lq, L, 2 or 4\\)"):
        _module()(**inputs)


def test_parameter_names_and_shapes_match_the_original_checkpoints(reference):
    keys = reference["deformable_detr"]["keys"]
    prefix = "transformer.encoder.layers.0.self_attn."
    expected = {name[len(prefix) :]: shape for name, shape in keys.items() if name.startswith(prefix)}
    got = {name: list(tensor.shape) for name, tensor in MSDeformAttn().state_dict().items()}
    assert got == expected
