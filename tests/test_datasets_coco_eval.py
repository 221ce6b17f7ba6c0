"""COCO evaluation: perfect detections score 1, the metrics are pycocotools' own, each image counts once."""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import (
    METRIC_NAMES,
    CocoEvaluator,
    merge_detections,
    to_coco_results,
)

IMAGES = [{"id": image_id, "file_name": f"{image_id}.png", "height": 300, "width": 400} for image_id in (1, 2, 5)]
CATEGORIES = [{"id": 2, "name": "circle"}, {"id": 7, "name": "square"}]
# [x, y, w, h]: small, medium and large boxes; image 5 has none.
BOXES = {
    1: [([10, 10, 20, 15], 2), ([50, 40, 120, 90], 7), ([200, 100, 150, 180], 2)],
    2: [([30, 30, 60, 50], 7), ([100, 120, 25, 25], 7)],
}


@pytest.fixture
def gt_file(tmp_path):
    rows = [(image_id, box, category) for image_id, boxes in BOXES.items() for box, category in boxes]
    annotations = [
        {
            "id": index + 1,
            "image_id": image_id,
            "category_id": category,
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": 0,
        }
        for index, (image_id, box, category) in enumerate(rows)
    ]
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps({"images": IMAGES, "annotations": annotations, "categories": CATEGORIES}))
    return path


@pytest.fixture
def coco_gt(gt_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt_file))


def _detections(rows: list[tuple[list[float], int]], scores: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Detections from ``[x, y, w, h]`` boxes and labels, as a post-processor gives them: x0, y0, x1, y1."""
    boxes = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), _ in rows], dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor(scores if scores is not None else [0.9] * len(rows), dtype=torch.float32)
    return {"boxes": boxes, "scores": scores, "labels": torch.tensor([label for _, label in rows])}


def _perfect() -> dict[int, dict[str, torch.Tensor]]:
    return {image_id: _detections(BOXES.get(image_id, [])) for image_id in (1, 2, 5)}


def _noisy(seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    detections = {}
    for image_id in (1, 2, 5):
        rows = [([value + rng.normal(0, 4) for value in box], label) for box, label in BOXES.get(image_id, [])]
        rows += [
            (
                [rng.uniform(0, 300), rng.uniform(0, 200), rng.uniform(10, 90), rng.uniform(10, 90)],
                int(rng.choice([2, 7])),
            )
            for _ in range(3)
        ]
        detections[image_id] = _detections(rows, rng.uniform(0.05, 1.0, len(rows)).tolist())
    return detections


def test_perfect_detections_give_ap_one(coco_gt):
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(_perfect())
    metrics = evaluator.evaluate()
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)


def test_metrics_equal_pycocotools_run_on_the_written_file(coco_gt, gt_file, tmp_path):
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(_noisy())
    metrics = evaluator.evaluate(output_path=tmp_path / "out" / "detections.json")
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(gt_file))
        direct = COCOeval(ground_truth, ground_truth.loadRes(str(tmp_path / "out" / "detections.json")), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    assert 0.0 < metrics["AP"] < 1.0
    assert [metrics[name] for name in METRIC_NAMES] == [float(value) for value in direct.stats]
    assert "Average Precision" in evaluator.summary


def test_written_results_use_coco_format_with_category_ids(coco_gt, tmp_path):
    evaluator = CocoEvaluator(coco_gt, label_to_category_id={0: 2, 1: 7})
    evaluator.update(
        {
            1: {
                "boxes": torch.tensor([[10.0, 10.0, 30.0, 25.0], [1.0, 1.0, 2.0, 2.0]]),
                "scores": torch.tensor([0.8, 0.4]),
                "labels": torch.tensor([0, 5]),
            }
        }
    )
    evaluator.evaluate(output_path=tmp_path / "detections.json")
    written = json.loads((tmp_path / "detections.json").read_text())
    # label 5 has no category and is left out
    assert written == [{"image_id": 1, "category_id": 2, "bbox": [10.0, 10.0, 20.0, 15.0], "score": pytest.approx(0.8)}]


@pytest.mark.parametrize("images_seen", [(), (1, 2, 5)])
def test_empty_detections_give_zeros(coco_gt, tmp_path, images_seen):
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({image_id: _detections([]) for image_id in images_seen})
    metrics = evaluator.evaluate(output_path=tmp_path / "detections.json")
    assert metrics == dict.fromkeys(METRIC_NAMES, 0.0)
    assert json.loads((tmp_path / "detections.json").read_text()) == []


def test_duplicates_from_several_ranks_count_once(coco_gt):
    noisy = _noisy()
    # A padded DistributedSampler: rank 0 saw images 1 and 5, rank 1 saw 2 and (padding) 1 again.
    rank0 = {1: noisy[1], 5: noisy[5]}
    rank1 = {2: noisy[2], 1: noisy[1]}
    merged = merge_detections([rank0, rank1])
    assert sorted(merged) == [1, 2, 5]
    assert len(to_coco_results(merged)) == len(to_coco_results(noisy))
    single = CocoEvaluator(coco_gt)
    single.update(noisy)
    gathered = CocoEvaluator(coco_gt)
    for part in (rank0, rank1):
        gathered.update(part)
    recipe = CocoEvaluator(coco_gt)  # the module docstring's all_gather_object recipe
    recipe.detections = merge_detections(pickle.loads(pickle.dumps([rank0, rank1])))
    assert gathered.evaluate() == recipe.evaluate() == single.evaluate()


def test_only_the_images_seen_are_evaluated(coco_gt):
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({1: _perfect()[1]})  # image 2's boxes were never looked at: they do not count as misses
    assert evaluator.evaluate()["AP"] == pytest.approx(1.0)


def test_unknown_image_id_is_named(coco_gt):
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({42: _detections([([1, 1, 5, 5], 2)])})
    with pytest.raises(ValueError, match=r"image ids \[42\]"):
        evaluator.evaluate()


def test_detections_of_different_lengths_are_named():
    bad = {"boxes": torch.zeros(2, 4), "scores": torch.zeros(3), "labels": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(ValueError, match="detections of image id 3"):
        merge_detections([{3: bad}])
