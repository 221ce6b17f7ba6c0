"""DeformableTransformer: padding is invisible (a map alone equals the same map padded with its mask), encoder
reference points, two-stage proposals, and the sampling opt-in."""

from __future__ import annotations

import torch

from models import build_model
from models.deformable_encoder import DeformableEncoder
from models.deformable_transformer import encoder_proposals, valid_ratio
from models.position_encoding import PositionEmbeddingSine
from tests.tiny_model import VARIANTS, randomize_zero_initialised, tiny_config

LEVEL_SHAPES = [(8, 12), (4, 6), (2, 3), (1, 2)]


def transformer_inputs(features: list[torch.Tensor], masks: list[torch.Tensor]):
    encoding = PositionEmbeddingSine(32)
    return features, masks, [encoding(mask) for mask in masks]


def pad_levels(features: list[torch.Tensor], extra: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each level padded by ``extra`` cells at the bottom and right (zeros), with its mask."""
    padded, masks = [], []
    for feature in features:
        batch, channels, height, width = feature.shape
        canvas = feature.new_zeros(batch, channels, height + extra, width + extra)
        canvas[..., :height, :width] = feature
        mask = torch.ones(batch, height + extra, width + extra, dtype=torch.bool)
        mask[:, :height, :width] = False
        padded.append(canvas)
        masks.append(mask)
    return padded, masks


def test_padded_maps_give_the_outputs_of_the_unpadded_maps():
    for variant in ("deformable_detr", "box_refine", "two_stage"):
        torch.manual_seed(0)
        model, _, _ = build_model(tiny_config(*VARIANTS[variant]))
        randomize_zero_initialised(model)
        transformer = model.transformer.eval()
        features = [torch.randn(1, 64, height, width) for height, width in LEVEL_SHAPES]
        masks = [torch.zeros(1, height, width, dtype=torch.bool) for height, width in LEVEL_SHAPES]
        query_embed = None if model.two_stage else model.query_embed.weight
        with torch.no_grad():
            alone = transformer(*transformer_inputs(features, masks), query_embed)
            padded = transformer(*transformer_inputs(*pad_levels(features, 2)), query_embed)
        torch.testing.assert_close(padded["hidden_states"], alone["hidden_states"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(padded["inter_references"], alone["inter_references"], atol=1e-5, rtol=1e-5)


def test_encoder_reference_points_are_pixel_centres_of_the_unpadded_map():
    spatial_shapes = torch.tensor([[4, 6], [2, 3]])
    valid_ratios = torch.tensor([[[0.5, 0.75], [0.5, 0.75]]])  # 3 of 6 columns, 3 of 4 rows are the image
    points = DeformableEncoder.reference_points(spatial_shapes, valid_ratios)
    assert points.shape == (1, 24 + 6, 2, 2)
    # level 0 pixel (row 0, column 1): centre (1.5 / 3, 0.5 / 3) of the image, on the padded level 0 map
    torch.testing.assert_close(points[0, 1, 0], torch.tensor([1.5 / 3 * 0.5, 0.5 / 3 * 0.75]))


def test_valid_ratio_is_the_unpadded_share():
    mask = torch.ones(1, 4, 8, dtype=torch.bool)
    mask[:, :3, :2] = False
    torch.testing.assert_close(valid_ratio(mask), torch.tensor([[2 / 8, 3 / 4]]))


def test_proposals_are_centred_on_pixels_and_sized_by_level():
    level_shapes = [(4, 4), (2, 2)]
    memory = torch.ones(1, 20, 8)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, [3, 7, 11, 15]] = True  # the last column of level 0 is padding: 3 columns of image
    output_memory, proposals = encoder_proposals(memory, mask, level_shapes)
    boxes = proposals.sigmoid()
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.5 / 3, 0.125, 0.05, 0.05]))
    torch.testing.assert_close(boxes[0, 16], torch.tensor([0.25, 0.25, 0.1, 0.1]))
    assert torch.isinf(proposals[0, 3]).all() and (output_memory[0, 3] == 0).all()
