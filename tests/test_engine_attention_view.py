"""engine.attention_view end to end on tiny models: the plotted points are the op's, weights sum to 1, the far
corner, the valid ratios are the transformer's, figures and JSON written from saved weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.transforms import build_transforms
from engine.attention_view import (
    decoder_figure,
    encoder_figure,
    level_valid_ratios,
    run_with_sampling,
    sample_attention,
    sampling_record,
    write_visualization,
)
from models import build_model
from ops import record_sampling
from tests.tiny_model import VARIANTS, randomize_zero_initialised, tiny_config

ORIGINAL_SIZE = (90, 130)  # (height, width): resized to 64x92 by the transforms below
TRANSFORMS = build_transforms("val", val_size=64, max_size=128)


def tiny_model(variant: str = "deformable_detr") -> torch.nn.Module:
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(*VARIANTS[variant]))
    randomize_zero_initialised(model)
    return model


def gradient_image() -> Image.Image:
    """A smooth colour gradient: something to look at under the points."""
    height, width = ORIGINAL_SIZE
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], -1).astype(np.uint8)
    return Image.fromarray(pixels)


def last_layers(records: dict) -> dict:
    """What the op of the last encoder and decoder layers sampled with (``ops.record_sampling``'s records, which
    test_ops_sampling_record.py shows to be exactly that), by the modules' names."""
    return {
        "encoder": records["transformer.encoder.layers.0.self_attn"][-1],
        "decoder": records["transformer.decoder.layers.1.cross_attn"][-1],
    }


def scatter_rows(axes) -> np.ndarray:
    """The first scatter of ``axes`` as sorted rows (x, y, weight)."""
    scatter = axes.collections[0]
    rows = np.concatenate([scatter.get_offsets(), scatter.get_array()[:, None]], 1)
    return rows[np.lexsort(rows.T[::-1])]


def expected_rows(locations: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """(M, L, P, 2) in [0, 1] of an unpadded map, (M, L, P) -> sorted rows (x, y, weight) in original pixels."""
    height, width = ORIGINAL_SIZE
    pixels = (locations * torch.tensor([width, height])).reshape(-1, 2)
    rows = torch.cat([pixels, weights.reshape(-1, 1)], 1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


@pytest.fixture(scope="module")
def view_and_caught():
    view = sample_attention(
        tiny_model(), gradient_image(), TRANSFORMS, threshold=0.0, top_k=3, points=[(10.0, 20.0), (130.0, 90.0)]
    )
    return view, last_layers(view.records)


def test_image_is_resized_and_unpadded(view_and_caught):
    view, _ = view_and_caught
    assert view.resized_size == (64, 92)


def test_plotted_decoder_points_equal_op_locations_in_pixels(view_and_caught):
    view, caught = view_and_caught
    locations, weights = caught["decoder"].sampling_locations, caught["decoder"].attention_weights
    figure = decoder_figure(view)
    for axes, item in zip(figure.axes, view.decoder):
        query = item.detection.query
        np.testing.assert_allclose(
            scatter_rows(axes), expected_rows(locations[0, query], weights[0, query]), rtol=1e-5, atol=1e-4
        )


def test_plotted_decoder_reference_cross_is_the_op_reference_point(view_and_caught):
    view, caught = view_and_caught
    height, width = ORIGINAL_SIZE
    figure = decoder_figure(view)
    for axes, item in zip(figure.axes, view.decoder):
        reference = caught["decoder"].reference_points[0, item.detection.query, 0, :2] * torch.tensor([width, height])
        np.testing.assert_allclose(axes.lines[0].get_xydata()[0], reference.numpy(), rtol=1e-5)


def test_below_threshold_the_best_queries_are_shown_and_marked():
    view = sample_attention(tiny_model(), gradient_image(), TRANSFORMS, threshold=1.0, top_k=2)
    assert view.detections == []
    assert len(view.decoder) == 2 and not any(item.above_threshold for item in view.decoder)
    assert "below threshold" in decoder_figure(view).axes[0].get_title()


def test_plotted_encoder_points_equal_op_locations_in_pixels(view_and_caught):
    view, caught = view_and_caught
    locations, weights = caught["encoder"].sampling_locations, caught["encoder"].attention_weights
    figure = encoder_figure(view)
    for axes, item in zip(figure.axes, view.encoder):
        np.testing.assert_allclose(
            scatter_rows(axes), expected_rows(locations[0, item.query], weights[0, item.query]), rtol=1e-5, atol=1e-4
        )


def test_far_corner_point_has_its_reference_in_the_last_cell(view_and_caught):
    view, _ = view_and_caught
    height, width = ORIGINAL_SIZE
    # level 0 of the 64x92 input: 8x12 cells, each 130 / 12 wide and 90 / 8 high in the original image
    reference = view.encoder[1].sampling.reference_point
    torch.testing.assert_close(reference, torch.tensor([width * 11.5 / 12, height * 7.5 / 8]))


def test_decoder_shows_top_k_best_first(view_and_caught):
    view, _ = view_and_caught
    scores = [item.detection.score for item in view.decoder]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert [item.detection for item in view.decoder] == view.detections[:3]


def test_record_weights_sum_to_one_per_query_and_head(view_and_caught):
    view, _ = view_and_caught
    record = sampling_record(view)
    for part in ("decoder", "encoder"):
        for query in record[part]["queries"]:
            num_heads = len(query["levels"][0]["heads"])
            for head in range(num_heads):
                total = sum(sum(level["heads"][head]["attention_weights"]) for level in query["levels"])
                assert total == pytest.approx(1.0, abs=1e-4)


def test_record_points_equal_op_locations_in_pixels(view_and_caught):
    view, caught = view_and_caught
    locations = caught["decoder"].sampling_locations
    query = sampling_record(view)["decoder"]["queries"][0]
    height, width = ORIGINAL_SIZE
    level, head = 1, 1
    expected = locations[0, query["query"], head, level] * torch.tensor([width, height])
    recorded = torch.tensor(query["levels"][level]["heads"][head]["sampling_points"])
    torch.testing.assert_close(recorded, expected, atol=1e-3, rtol=0)


def test_by_level_and_by_head_give_a_panel_per_query_and_level_or_head(view_and_caught):
    view, _ = view_and_caught
    num_heads, num_levels, _ = view.decoder[0].sampling.attention_weights.shape
    assert len(decoder_figure(view, "level").axes) == 3 * num_levels + 1  # + the colour bar
    assert len(encoder_figure(view, "head").axes) == 2 * num_heads + 1


def test_unknown_split_is_an_error(view_and_caught):
    view, _ = view_and_caught
    with pytest.raises(ValueError, match="split must be one of"):
        decoder_figure(view, "layer")


def test_earlier_layer_is_chosen_with_layer():
    view = sample_attention(tiny_model(), gradient_image(), TRANSFORMS, threshold=0.0, top_k=1, layer=0)
    first = view.records["transformer.decoder.layers.0.cross_attn"][-1].sampling_locations
    height, width = ORIGINAL_SIZE
    expected = first[0, view.decoder[0].detection.query] * torch.tensor([width, height])
    assert view.decoder_layer == 0
    torch.testing.assert_close(view.decoder[0].sampling.sampling_points, expected)


@pytest.mark.parametrize("variant", ["deformable_detr", "two_stage_without_box_refine"])
def test_writes_figures_and_record_from_saved_weights(variant, tmp_path):
    """(Every variant runs through main.py in test_engine_visualize.py.)"""
    torch.save(tiny_model(variant).state_dict(), tmp_path / "weights.pth")
    model, _, _ = build_model(tiny_config(*VARIANTS[variant]))
    model.load_state_dict(torch.load(tmp_path / "weights.pth", weights_only=True))
    view = sample_attention(model, gradient_image(), TRANSFORMS, threshold=0.0, top_k=2)
    written = write_visualization(view, tmp_path / "out", "gradient", names={0: "circle"})
    assert sorted(path.name for path in written) == [
        "gradient_decoder_sampling.png",
        "gradient_detections.png",
        "gradient_encoder_sampling.png",
        "gradient_sampling.json",
    ]
    record = json.loads((tmp_path / "out" / "gradient_sampling.json").read_text())
    box_reference = variant in ("box_refine", "two_stage", "two_stage_without_box_refine")
    assert all((query["reference_box"] is not None) == box_reference for query in record["decoder"]["queries"])
    assert len(record["encoder"]["queries"]) == 2  # the centres of the two shown detections


def test_sixteen_bit_grey_image_is_seen_like_its_eight_bit_version():
    height, width = ORIGINAL_SIZE
    sixteen_bit = (np.arange(height * width).reshape(height, width) * 65535 // (height * width - 1)).astype(np.uint16)
    eight_bit = np.rint(sixteen_bit / 65535 * 255).astype(np.uint8)  # the documented scaling, computed here
    model = tiny_model()
    outputs, _, _ = run_with_sampling(model, Image.fromarray(sixteen_bit), TRANSFORMS)
    expected, _, _ = run_with_sampling(model, Image.fromarray(eight_bit).convert("RGB"), TRANSFORMS)
    torch.testing.assert_close(outputs["pred_logits"], expected["pred_logits"])


def test_view_keeps_the_rgb_version_of_a_sixteen_bit_image():
    gradient = np.linspace(0, 65535, ORIGINAL_SIZE[1]).round().astype(np.uint16)[None].repeat(ORIGINAL_SIZE[0], 0)
    view = sample_attention(tiny_model(), Image.fromarray(gradient), TRANSFORMS, top_k=1)
    expected = np.rint(gradient / 65535 * 255).astype(np.uint8)
    assert view.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(view.image), np.repeat(expected[..., None], 3, -1))


def test_valid_ratios_from_the_recorded_padding_mask_are_the_transformers():
    model = tiny_model()
    model.eval()
    caught = {}
    model.transformer.encoder.register_forward_pre_hook(lambda _, args: caught.update(valid_ratios=args[3]))
    with torch.no_grad(), record_sampling(model) as records:
        model([torch.randn(3, 64, 96), torch.randn(3, 40, 56)])  # image 1 padded on every level
    for name in ("transformer.encoder.layers.0.self_attn", "transformer.decoder.layers.0.cross_attn"):
        assert torch.equal(level_valid_ratios(records[name][-1]), caught["valid_ratios"])
    assert (caught["valid_ratios"][1] < 1).any()
