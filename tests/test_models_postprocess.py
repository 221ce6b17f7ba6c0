"""PostProcess: top-k over queries x classes, boxes as x0, y0, x1, y1 in image pixels."""

from __future__ import annotations

import pytest
import torch

from models.postprocess import PostProcess


def test_boxes_are_in_pixels_and_scores_sorted():
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 1, 0] = 4.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]])
    result = PostProcess(num_detections=4)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    assert result["scores"].shape == (4,) and (result["scores"][:-1] >= result["scores"][1:]).all()
    assert result["labels"][0].item() == 0
    torch.testing.assert_close(result["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 100.0]))


def test_fewer_pairs_than_detections():
    outputs = {"pred_logits": torch.randn(2, 3, 2), "pred_boxes": torch.rand(2, 3, 4)}
    results = PostProcess()(outputs, torch.tensor([[10, 10], [20, 30]]))
    assert [len(result["scores"]) for result in results] == [6, 6]


def test_target_sizes_of_wrong_shape_are_named():
    outputs = {"pred_logits": torch.randn(2, 3, 2), "pred_boxes": torch.rand(2, 3, 4)}
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(outputs, torch.tensor([10, 10]))
