"""util.visualize_points: padded-level locations to original pixels, on a tiny model in a padded batch."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from tests.tiny_model import VARIANTS, randomize_zero_initialised, tiny_config
from util.visualize_points import (
    decoder_query_sampling,
    encoder_query_index,
    encoder_query_sampling,
    resolve_layer,
    to_image_pixels,
)

# Image 1 of the batch: a 80x112 original resized by half to 40x56, padded to 64x96 by image 0.
ORIGINAL_SIZE = (80, 112)


def run_padded_batch(variant: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Outputs with sampling for a two-image padded batch, and what the last encoder and decoder layers' op
    returned (sampling_locations, attention_weights), caught by forward hooks."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(*VARIANTS[variant]))
    randomize_zero_initialised(model)
    model.eval()
    caught = {}

    def catch(name):
        def hook(module, inputs, output):
            caught[name] = (output[1], output[2])

        return hook

    model.transformer.encoder.layers[-1].self_attn.register_forward_hook(catch("encoder"))
    model.transformer.decoder.layers[-1].cross_attn.register_forward_hook(catch("decoder"))
    with torch.no_grad():
        outputs = model([torch.randn(3, 64, 96), torch.randn(3, 40, 56)], return_sampling=True)
    return outputs, caught


@pytest.fixture(scope="module")
def padded_batch():
    return run_padded_batch("deformable_detr")


def test_far_corner_of_unpadded_part_maps_to_far_corner_of_image():
    valid_ratios = torch.tensor([0.5, 0.75])
    corners = torch.tensor([[0.0, 0.0], [0.5, 0.75]])
    pixels = to_image_pixels(corners, valid_ratios, (300, 400))
    torch.testing.assert_close(pixels, torch.tensor([[0.0, 0.0], [400.0, 300.0]]))


def test_padded_image_has_valid_ratios_below_one_on_the_finest_level(padded_batch):
    outputs, _ = padded_batch
    assert (outputs["valid_ratios"][0] == 1).all()
    assert (outputs["valid_ratios"][1, 0] < 1).all()  # coarse levels round the padding away


def test_far_corner_query_of_padded_image_is_its_last_unpadded_cell(padded_batch):
    outputs, _ = padded_batch
    height, width = ORIGINAL_SIZE
    query = encoder_query_index(outputs, 1, (width, height), ORIGINAL_SIZE)
    # level 0 (stride 8) of the 40x56 image: 5x7 unpadded cells of a 8x12 map; the last is row 4, column 6
    assert tuple(outputs["spatial_shapes"][0].tolist()) == (8, 12)
    assert query == 4 * 12 + 6
    sampling = encoder_query_sampling(outputs, -1, 1, query, ORIGINAL_SIZE)
    # that cell's centre: 6.5 of 7 cells across, 4.5 of 5 down
    torch.testing.assert_close(sampling.reference_point, torch.tensor([6.5 / 7 * width, 4.5 / 5 * height]))


def test_encoder_reference_is_one_image_point_on_every_level(padded_batch):
    outputs, _ = padded_batch
    height, width = ORIGINAL_SIZE
    query = encoder_query_index(outputs, 1, (width, height), ORIGINAL_SIZE)
    per_level = to_image_pixels(
        outputs["encoder_reference_points"][1, query], outputs["valid_ratios"][1], ORIGINAL_SIZE
    )
    torch.testing.assert_close(per_level, per_level[:1].expand_as(per_level))


def test_encoder_points_equal_op_locations_mapped_with_each_levels_ratio(padded_batch):
    outputs, caught = padded_batch
    locations, weights = caught["encoder"]
    query = encoder_query_index(outputs, 1, (30.0, 20.0), ORIGINAL_SIZE)
    sampling = encoder_query_sampling(outputs, -1, 1, query, ORIGINAL_SIZE)
    valid_ratios = outputs["valid_ratios"][1]  # (L, 2)
    for level in range(valid_ratios.shape[0]):
        expected = locations[1, query, :, level] / valid_ratios[level] * torch.tensor([112.0, 80.0])
        torch.testing.assert_close(sampling.sampling_points[:, level], expected)
    torch.testing.assert_close(sampling.attention_weights, weights[1, query])


@pytest.mark.parametrize("variant", ["deformable_detr", "box_refine", "two_stage_without_box_refine"])
def test_decoder_points_equal_op_locations_mapped(variant):
    outputs, caught = run_padded_batch(variant)
    locations, weights = caught["decoder"]
    valid_ratios = outputs["valid_ratios"][1]
    for query in range(locations.shape[1]):
        sampling = decoder_query_sampling(outputs, -1, 1, query, ORIGINAL_SIZE)
        expected = locations[1, query] / valid_ratios[None, :, None, :] * torch.tensor([112.0, 80.0])
        torch.testing.assert_close(sampling.sampling_points, expected)
        torch.testing.assert_close(sampling.attention_weights, weights[1, query])
        assert (sampling.reference_box is not None) == (variant != "deformable_detr")
        if sampling.reference_box is not None:
            centre = (sampling.reference_box[:2] + sampling.reference_box[2:]) / 2
            torch.testing.assert_close(centre, sampling.reference_point)


def test_decoder_weights_sum_to_one_per_head_over_levels_and_points(padded_batch):
    outputs, _ = padded_batch
    sampling = decoder_query_sampling(outputs, -1, 1, 0, ORIGINAL_SIZE)
    sums = sampling.attention_weights.sum((1, 2))
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_layer_out_of_range_names_the_layer_count():
    with pytest.raises(ValueError, match="decoder has 2 layer"):
        resolve_layer(2, 2, "decoder")
    assert resolve_layer(-1, 2, "decoder") == 1


def test_point_outside_image_is_an_error(padded_batch):
    outputs, _ = padded_batch
    with pytest.raises(ValueError, match="outside the 112x80 image"):
        encoder_query_index(outputs, 1, (113.0, 10.0), ORIGINAL_SIZE)


def test_outputs_without_sampling_are_an_error():
    with pytest.raises(ValueError, match="return_sampling=True"):
        decoder_query_sampling({"pred_logits": torch.zeros(1, 1, 1)}, -1, 0, 0, ORIGINAL_SIZE)
