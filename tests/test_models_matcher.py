"""HungarianMatcher: optimal against brute force, batched equals single calls, empty targets."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from models.matcher import HungarianMatcher


def random_outputs(batch: int, queries: int, classes: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "pred_logits": torch.randn(batch, queries, classes, generator=generator),
        "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.1,
    }


def random_target(count: int, classes: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.randint(0, classes, (count,), generator=generator),
        "boxes": torch.rand(count, 4, generator=generator) * 0.5 + 0.1,
    }


def pair_cost(matcher: HungarianMatcher, logits, box, label, target_box) -> float:
    """The cost of one (prediction, target) pair, written out independently."""
    p = logits[label].sigmoid()
    alpha, gamma = matcher.focal_alpha, matcher.focal_gamma
    focal = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8) - (1 - alpha) * p**gamma * -torch.log(1 - p + 1e-8)
    l1 = (box - target_box).abs().sum()
    giou = generalized_box_iou(
        box_convert(box[None], "cxcywh", "xyxy"), box_convert(target_box[None], "cxcywh", "xyxy")
    )
    return float(matcher.cost_class * focal + matcher.cost_bbox * l1 - matcher.cost_giou * giou[0, 0])


def test_assignment_is_optimal_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    for queries, count in [(4, 3), (5, 5), (6, 2)]:
        outputs = random_outputs(1, queries, 3, generator)
        target = random_target(count, 3, generator)
        rows, columns = matcher(outputs, [target])[0]
        costs = [
            [
                pair_cost(
                    matcher,
                    outputs["pred_logits"][0, q],
                    outputs["pred_boxes"][0, q],
                    target["labels"][t],
                    target["boxes"][t],
                )
                for t in range(count)
            ]
            for q in range(queries)
        ]
        found = sum(costs[q][t] for q, t in zip(rows.tolist(), columns.tolist()))
        best = min(
            sum(costs[q][t] for t, q in enumerate(chosen)) for chosen in itertools.permutations(range(queries), count)
        )
        assert len(rows) == count and abs(found - best) < 1e-4


def test_batched_call_equals_single_calls():
    generator = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher()
    outputs = random_outputs(3, 6, 4, generator)
    targets = [random_target(count, 4, generator) for count in (2, 0, 4)]
    batched = matcher(outputs, targets)
    for image, target in enumerate(targets):
        single = matcher({key: value[image : image + 1] for key, value in outputs.items()}, [target])[0]
        assert torch.equal(batched[image][0], single[0]) and torch.equal(batched[image][1], single[1])


def test_empty_targets_give_empty_matches():
    generator = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = matcher(random_outputs(2, 5, 3, generator), [empty, empty])
    assert [(len(rows), len(columns)) for rows, columns in indices] == [(0, 0), (0, 0)]
    assert indices[0][0].dtype == torch.int64


def test_non_finite_predictions_are_named_not_left_to_scipy():
    generator = torch.Generator().manual_seed(0)
    outputs = random_outputs(1, 5, 3, generator)
    outputs["pred_boxes"][0, 2] = float("nan")
    with pytest.raises(ValueError, match="the matching costs are not finite: pred_logits or pred_boxes hold NaN"):
        HungarianMatcher()(outputs, [random_target(2, 3, generator)])
