"""util.visualize_points: padded-level locations to original pixels, on a tiny model in a padded batch."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from ops import AttentionSampling, record_sampling
from tests.tiny_model import VARIANTS, randomize_zero_initialised, tiny_config
from util.visualize_points import cell_query_index, query_sampling, resolve_layer, to_image_pixels

# Image 1 of the batch: a 80x112 original resized by half to 40x56, padded to 64x96 by image 0.
ORIGINAL_SIZE = (80, 112)


def run_padded_batch(variant: str) -> tuple[dict[str, AttentionSampling], torch.Tensor]:
    """Where the last encoder and decoder layers sampled in a two-image padded batch (ops.record_sampling), and
    the valid ratios (N, L, 2) the transformer computed, caught on their way into the encoder."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(*VARIANTS[variant]))
    randomize_zero_initialised(model)
    model.eval()
    caught = {}
    model.transformer.encoder.register_forward_pre_hook(lambda _, args: caught.update(valid_ratios=args[3]))
    with torch.no_grad(), record_sampling(model) as records:
        model([torch.randn(3, 64, 96), torch.randn(3, 40, 56)])
    last = {
        "encoder": records["transformer.encoder.layers.0.self_attn"][-1],
        "decoder": records["transformer.decoder.layers.1.cross_attn"][-1],
    }
    return last, caught["valid_ratios"]


def image_query(sampling: AttentionSampling, valid_ratios: torch.Tensor, query: int):
    """Query ``query`` of image 1 in pixels of its original."""
    return query_sampling(
        sampling.sampling_locations[1, query],
        sampling.attention_weights[1, query],
        sampling.reference_points[1, query],
        valid_ratios[1],
        ORIGINAL_SIZE,
    )


def encoder_query(sampling: AttentionSampling, valid_ratios: torch.Tensor, pixel: tuple[float, float]) -> int:
    return cell_query_index(sampling.spatial_shapes, sampling.level_start_index, valid_ratios[1], pixel, ORIGINAL_SIZE)


@pytest.fixture(scope="module")
def padded_batch():
    return run_padded_batch("deformable_detr")


def test_far_corner_of_unpadded_part_maps_to_far_corner_of_image():
    valid_ratios = torch.tensor([0.5, 0.75])
    corners = torch.tensor([[0.0, 0.0], [0.5, 0.75]])
    pixels = to_image_pixels(corners, valid_ratios, (300, 400))
    torch.testing.assert_close(pixels, torch.tensor([[0.0, 0.0], [400.0, 300.0]]))


def test_padded_image_has_valid_ratios_below_one_on_the_finest_level(padded_batch):
    _, valid_ratios = padded_batch
    assert (valid_ratios[0] == 1).all()
    assert (valid_ratios[1, 0] < 1).all()  # coarse levels round the padding away


def test_far_corner_query_of_padded_image_is_its_last_unpadded_cell(padded_batch):
    last, valid_ratios = padded_batch
    height, width = ORIGINAL_SIZE
    query = encoder_query(last["encoder"], valid_ratios, (width, height))
    # level 0 (stride 8) of the 40x56 image: 5x7 unpadded cells of a 8x12 map; the last is row 4, column 6
    assert tuple(last["encoder"].spatial_shapes[0].tolist()) == (8, 12)
    assert query == 4 * 12 + 6
    sampling = image_query(last["encoder"], valid_ratios, query)
    # that cell's centre: 6.5 of 7 cells across, 4.5 of 5 down
    torch.testing.assert_close(sampling.reference_point, torch.tensor([6.5 / 7 * width, 4.5 / 5 * height]))


def test_encoder_reference_is_one_image_point_on_every_level(padded_batch):
    last, valid_ratios = padded_batch
    height, width = ORIGINAL_SIZE
    query = encoder_query(last["encoder"], valid_ratios, (width, height))
    per_level = to_image_pixels(last["encoder"].reference_points[1, query], valid_ratios[1], ORIGINAL_SIZE)
    torch.testing.assert_close(per_level, per_level[:1].expand_as(per_level))


def test_encoder_points_equal_op_locations_mapped_with_each_levels_ratio(padded_batch):
    last, valid_ratios = padded_batch
    encoder = last["encoder"]
    query = encoder_query(encoder, valid_ratios, (30.0, 20.0))
    sampling = image_query(encoder, valid_ratios, query)
    for level in range(valid_ratios.shape[1]):
        expected = encoder.sampling_locations[1, query, :, level] / valid_ratios[1, level] * torch.tensor([112.0, 80.0])
        torch.testing.assert_close(sampling.sampling_points[:, level], expected)
    torch.testing.assert_close(sampling.attention_weights, encoder.attention_weights[1, query])


@pytest.mark.parametrize("variant", ["deformable_detr", "box_refine", "two_stage_without_box_refine"])
def test_decoder_points_equal_op_locations_mapped(variant):
    last, valid_ratios = run_padded_batch(variant)
    decoder = last["decoder"]
    for query in range(decoder.sampling_locations.shape[1]):
        sampling = image_query(decoder, valid_ratios, query)
        expected = (
            decoder.sampling_locations[1, query] / valid_ratios[1, None, :, None, :] * torch.tensor([112.0, 80.0])
        )
        torch.testing.assert_close(sampling.sampling_points, expected)
        torch.testing.assert_close(sampling.attention_weights, decoder.attention_weights[1, query])
        assert (sampling.reference_box is not None) == (variant != "deformable_detr")
        if sampling.reference_box is not None:
            centre = (sampling.reference_box[:2] + sampling.reference_box[2:]) / 2
            torch.testing.assert_close(centre, sampling.reference_point)


def test_decoder_weights_sum_to_one_per_head_over_levels_and_points(padded_batch):
    last, valid_ratios = padded_batch
    sampling = image_query(last["decoder"], valid_ratios, 0)
    sums = sampling.attention_weights.sum((1, 2))
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_layer_out_of_range_names_the_layer_count():
    with pytest.raises(ValueError, match="decoder has 2 layer"):
        resolve_layer(2, 2, "decoder")
    assert resolve_layer(-1, 2, "decoder") == 1


def test_point_outside_image_is_an_error(padded_batch):
    last, valid_ratios = padded_batch
    with pytest.raises(ValueError, match="outside the 112x80 image"):
        encoder_query(last["encoder"], valid_ratios, (113.0, 10.0))


def test_query_level_beyond_the_levels_is_an_error(padded_batch):
    last, valid_ratios = padded_batch
    encoder = last["encoder"]
    with pytest.raises(ValueError, match="query level 4 does not exist: the model has 4 feature level"):
        cell_query_index(encoder.spatial_shapes, encoder.level_start_index, valid_ratios[1], (1.0, 1.0), (8, 8), 4)
