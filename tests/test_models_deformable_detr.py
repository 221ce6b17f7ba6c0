"""DeformableDETR end to end on tiny configs: every variant's shapes, losses and gradients, odd sizes, batching,
recording where it samples, and overfitting one batch."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from ops import record_sampling
from tests.tiny_model import (
    VARIANTS,
    randomize_zero_initialised,
    tiny_config,
    tiny_targets,
)


def build_tiny(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    model, criterion, postprocessors = build_model(tiny_config(*overrides))
    randomize_zero_initialised(model, seed)
    return model, criterion, postprocessors


def assert_same_predictions(actual: dict, expected: dict, tolerance: float = 0.0) -> None:
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(actual[key], expected[key], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_outputs_losses_and_gradients(variant):
    model, criterion, _ = build_tiny(*VARIANTS[variant])
    images = torch.randn(2, 3, 64, 96)
    outputs = model(images)
    assert outputs["pred_logits"].shape == (2, 8, 5)
    assert outputs["pred_boxes"].shape == (2, 8, 4)
    assert ((outputs["pred_boxes"] >= 0) & (outputs["pred_boxes"] <= 1)).all()
    assert len(outputs["aux_outputs"]) == 1
    assert ("enc_outputs" in outputs) == ("two_stage" in variant)
    losses = criterion(outputs, tiny_targets())
    assert set(criterion.weight_dict) <= set(losses)
    assert all(torch.isfinite(value) for value in losses.values())
    criterion.total_loss(losses).backward()
    # Reached, not non-zero: zero-initialised layers (box heads' last layers, sampling offsets) give some exact
    # zeros at initialisation.
    no_gradient = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and (parameter.grad is None or not parameter.grad.isfinite().all())
    ]
    assert no_gradient == []


def test_two_stage_encoder_outputs_cover_every_pixel():
    model, _, _ = build_tiny(*VARIANTS["two_stage"])
    outputs = model(torch.randn(1, 3, 64, 64))
    pixels = 8 * 8 + 4 * 4 + 2 * 2 + 1  # strides 8, 16, 32, 64
    assert outputs["enc_outputs"]["pred_logits"].shape == (1, pixels, 5)
    assert outputs["enc_outputs"]["pred_boxes"].shape == (1, pixels, 4)


@pytest.mark.parametrize("height, width", [(33, 47), (97, 31), (1, 1)])
def test_odd_image_sizes(height, width):
    model, _, postprocessors = build_tiny(*VARIANTS["two_stage"])
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, height, width))
    assert torch.isfinite(outputs["pred_boxes"]).all() and torch.isfinite(outputs["pred_logits"]).all()
    results = postprocessors["bbox"](outputs, torch.tensor([[height, width]]))
    assert results[0]["boxes"].shape[1] == 4


def test_list_of_images_equals_padded_batch_with_mask():
    model, _, _ = build_tiny()
    model.eval()
    images = [torch.randn(3, 64, 80), torch.randn(3, 40, 56)]
    batch = torch.zeros(2, 3, 64, 80)
    mask = torch.ones(2, 64, 80, dtype=torch.bool)
    for index, image in enumerate(images):
        batch[index, :, : image.shape[1], : image.shape[2]] = image
        mask[index, : image.shape[1], : image.shape[2]] = False
    with torch.no_grad():
        assert_same_predictions(model(images), model(batch, mask))


@pytest.mark.parametrize("variant", ["deformable_detr", "two_stage"])
def test_image_alone_equals_image_in_padded_batch(variant):
    """The largest image of a batch (the other one padded) gets the outputs it gets alone.

    Not the padded image: as in the original, the backbone's convolutions see the padding and the input
    projections' GroupNorm takes its statistics over it; the transformer's part of padding invariance is tested
    in test_models_deformable_transformer.py.
    """
    model, _, _ = build_tiny(*VARIANTS[variant])
    model.eval()
    large, small = torch.randn(3, 64, 96), torch.randn(3, 40, 50)
    with torch.no_grad():
        alone = model(large[None])
        batched = model([large, small])
    assert_same_predictions(
        {key: value[:1] for key, value in batched.items() if key.startswith("pred_")}, alone, tolerance=1e-4
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_padding_mask_predicts_as_an_all_false_one(variant):
    # without a mask the transformer skips the masks altogether (valid ratios 1, nothing masked): the same
    # predictions, two-stage's proposals included, as the all-False mask it stands for
    model, _, _ = build_tiny(*VARIANTS[variant])
    model.eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        unmasked = model(images)
        masked = model(images, torch.zeros(2, 64, 96, dtype=torch.bool))
    assert_same_predictions(unmasked, masked, tolerance=0.0)
    if "enc_outputs" in masked:
        for key, value in masked["enc_outputs"].items():
            torch.testing.assert_close(unmasked["enc_outputs"][key], value, rtol=0, atol=0)


def test_record_sampling_gives_every_attention_layer():
    model, _, _ = build_tiny(*VARIANTS["box_refine"])
    images = torch.randn(2, 3, 64, 96)
    with record_sampling(model) as records:
        model(images, torch.zeros(2, 64, 96, dtype=torch.bool))
    assert list(records) == [
        "transformer.encoder.layers.0.self_attn",
        "transformer.decoder.layers.0.cross_attn",
        "transformer.decoder.layers.1.cross_attn",
    ]
    (encoder,) = records["transformer.encoder.layers.0.self_attn"]
    levels, heads, points = 4, 2, 4
    positions = int(encoder.spatial_shapes.prod(1).sum())
    assert encoder.reference_points.shape == (2, positions, levels, 2)
    assert encoder.sampling_locations.shape == (2, positions, heads, levels, points, 2)
    assert encoder.padding_mask.shape == (2, positions) and not encoder.padding_mask.any()
    (decoder,) = records["transformer.decoder.layers.1.cross_attn"]
    assert decoder.sampling_locations.shape == (2, 8, heads, levels, points, 2)
    assert decoder.reference_points.shape == (2, 8, levels, 4)  # refined boxes after the first layer
    weight_sums = decoder.attention_weights.flatten(-2).sum(-1)
    torch.testing.assert_close(weight_sums, torch.ones_like(weight_sums))
    with record_sampling(model) as records:
        model(images)  # no mask: none recorded
    assert all(record.padding_mask is None for layer in records.values() for record in layer)


def test_recording_does_not_change_predictions():
    model, _, _ = build_tiny()
    model.eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with record_sampling(model):
            recorded = model(images)
        assert_same_predictions(recorded, model(images))


def test_padding_mask_of_wrong_shape_is_named():
    model, _, _ = build_tiny()
    with pytest.raises(ValueError, match="padding_mask"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool))


def test_overfitting_one_batch_drives_the_loss_down():
    model, criterion, _ = build_tiny("lr_backbone=0")
    images = torch.randn(2, 3, 64, 64)
    targets = tiny_targets()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = criterion.total_loss(criterion(model(images), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
