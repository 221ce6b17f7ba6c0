"""engine.evaluation: metrics.json is what pycocotools computes from detections.json, each image counted once."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from datasets import METRIC_NAMES
from engine.data import build_eval_loader, build_split
from engine.evaluation import evaluate
from models import PostProcess
from tests.tiny_training import make_shapes, tiny_training_config


class JitteredTruth(nn.Module):
    """Predicts the batch's ground truth, jittered, plus a few low-scoring random boxes: a detector with an AP
    well between 0 and 1. The test's loader hands it the targets of the batch it is about to see."""

    def __init__(self, num_classes: int, queries: int = 6) -> None:
        super().__init__()
        self.num_classes, self.queries = num_classes, queries
        self.targets: list[dict] = []
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = torch.full((len(self.targets), self.queries, self.num_classes), -6.0)
        boxes = torch.rand(len(self.targets), self.queries, 4, generator=self.generator) * 0.5 + 0.25
        for index, target in enumerate(self.targets):
            count = len(target["labels"])
            noise = torch.randn(count, 4, generator=self.generator) * 0.03
            boxes[index, :count] = (target["boxes"] + noise).clamp(0.01, 0.99)
            logits[index, torch.arange(count), target["labels"]] = torch.randn(count, generator=self.generator) + 2
        return {"pred_logits": logits, "pred_boxes": boxes}


class Feeding:
    """``loader``, telling ``model`` the targets of each batch before it sees the batch."""

    def __init__(self, loader, model: JitteredTruth) -> None:
        self.loader, self.model = loader, model

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.model.targets = batch.targets
            yield batch


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    coco_path = make_shapes(root / "shapes")
    cfg = tiny_training_config(coco_path, root / "out")
    dataset = build_split("val", cfg)
    model = JitteredTruth(cfg.num_classes)
    loader = build_eval_loader(dataset, cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = evaluate(model, PostProcess(), Feeding(loader, model), dataset, torch.device("cpu"), root / "out")
    return metrics, dataset, root / "out"


def test_metrics_json_equals_pycocotools_on_detections_json(evaluated):
    metrics, dataset, output_dir = evaluated
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(dataset.annotation_file))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(output_dir / "detections.json")), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    written = json.loads((output_dir / "metrics.json").read_text())
    assert list(written) == list(METRIC_NAMES)
    assert written == pytest.approx(dict(zip(METRIC_NAMES, evaluation.stats.tolist())), abs=1e-12)
    assert written == pytest.approx(metrics)
    assert 0.05 < written["AP"] < 0.99  # a comparison that means something


def test_detections_json_has_every_image_and_original_category_ids(evaluated):
    _, dataset, output_dir = evaluated
    results = json.loads((output_dir / "detections.json").read_text())
    assert {result["image_id"] for result in results} == set(dataset.image_ids)
    assert {result["category_id"] for result in results} <= set(dataset.category_names)
    assert all(len(result["bbox"]) == 4 for result in results)
