"""SetCriterion and its weight_dict: names, perfect predictions, empty targets, the focal normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from models.criterion import SetCriterion, build_criterion, build_weight_dict
from models.matcher import HungarianMatcher
from tests.tiny_model import tiny_config


def outputs_for(boxes: torch.Tensor, labels: torch.Tensor, queries: int = 4, classes: int = 3) -> dict:
    """Predictions whose first len(boxes) queries are exactly the targets, confidently labelled."""
    logits = torch.full((1, queries, classes), -10.0)
    pred_boxes = torch.full((1, queries, 4), 0.5)
    logits[0, torch.arange(len(labels)), labels] = 10.0
    pred_boxes[0, : len(boxes)] = boxes
    return {"pred_logits": logits, "pred_boxes": pred_boxes}


def criterion(classes: int = 3) -> SetCriterion:
    return SetCriterion(num_classes=classes, matcher=HungarianMatcher(), weight_dict={"loss_ce": 2.0})


def test_weight_dict_names_every_layer_and_the_encoder():
    weights = build_weight_dict(tiny_config("dec_layers=3", "two_stage=true"))
    assert set(weights) == {
        f"{name}{suffix}" for name in ("loss_ce", "loss_bbox", "loss_giou") for suffix in ("", "_0", "_1", "_enc")
    }
    assert (weights["loss_ce_1"], weights["loss_bbox_enc"], weights["loss_giou"]) == (2.0, 5.0, 2.0)


def test_weight_dict_without_aux_loss_has_the_final_losses_only():
    assert set(build_weight_dict(tiny_config("aux_loss=false"))) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_perfect_predictions_have_no_box_loss_and_no_class_error():
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    labels = torch.tensor([2, 0])
    losses = criterion()(outputs_for(boxes, labels), [{"labels": labels, "boxes": boxes}])
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["class_error"].item() == 0.0
    assert losses["loss_ce"].item() < 1e-3


def test_focal_loss_is_normalised_as_the_original():
    """sum over queries of the mean over classes, / num_boxes, * queries."""
    boxes, labels = torch.tensor([[0.3, 0.3, 0.2, 0.2]]), torch.tensor([1])
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4) * 0.5 + 0.1}
    matched_query = HungarianMatcher()(outputs, [{"labels": labels, "boxes": boxes}])[0][0]
    one_hot = torch.zeros(1, 4, 3)
    one_hot[0, matched_query, 1] = 1
    expected = sigmoid_focal_loss(outputs["pred_logits"], one_hot, reduction="none").mean(1).sum() / 1 * 4
    losses = criterion()(outputs, [{"labels": labels, "boxes": boxes}])
    torch.testing.assert_close(losses["loss_ce"], expected)


def test_empty_targets_give_finite_losses():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = criterion()(outputs, [empty, empty])
    assert all(math.isfinite(value.item()) for value in losses.values())
    assert losses["loss_bbox"].item() == 0.0


def test_total_loss_weights_only_the_weighted_losses():
    losses = {"loss_ce": torch.tensor(1.0), "loss_bbox": torch.tensor(3.0), "class_error": torch.tensor(50.0)}
    assert criterion().total_loss(losses).item() == 2.0


def test_label_outside_the_classes_is_named():
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4)}
    with pytest.raises(ValueError, match="num_classes=3"):
        criterion()(outputs, [{"labels": torch.tensor([3]), "boxes": torch.rand(1, 4)}])


def test_build_criterion_uses_the_config_weights():
    built = build_criterion(tiny_config("cls_loss_coef=3", "set_cost_giou=4"))
    assert built.weight_dict["loss_ce"] == 3.0 and built.matcher.cost_giou == 4.0
