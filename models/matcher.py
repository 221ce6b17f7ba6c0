"""Hungarian matching of predictions to targets: focal class cost, L1 box cost, generalised IoU cost."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from util.config import Config


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU)`` per image.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs.
        focal_alpha, focal_gamma: of the focal class cost.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one of cost_class, cost_bbox, cost_giou must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``pred_logits`` (B, Q, num_classes) before sigmoid, ``pred_boxes`` (B, Q, 4) cx, cy, w, h.
            targets: B dicts with ``labels`` (n_i,) int64 and ``boxes`` (n_i, 4) cx, cy, w, h normalised.

        Returns:
            B pairs (query indices, target indices), int64, each of length min(Q, n_i).

        Raises:
            ValueError: a prediction is NaN or infinite, so that the costs cannot be ranked.
        """
        batch, queries = outputs["pred_logits"].shape[:2]
        probabilities = outputs["pred_logits"].flatten(0, 1).float().sigmoid()  # (B * Q, num_classes)
        pred_boxes = outputs["pred_boxes"].flatten(0, 1).float()
        target_labels = torch.cat([target["labels"] for target in targets])
        target_boxes = torch.cat([target["boxes"] for target in targets]).float()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = (1 - alpha) * probabilities**gamma * -(1 - probabilities + 1e-8).log()
        positive = alpha * (1 - probabilities) ** gamma * -(probabilities + 1e-8).log()
        cost_class = positive[:, target_labels] - negative[:, target_labels]
        cost_bbox = torch.cdist(pred_boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        )
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(batch, queries, -1).cpu()
        if not torch.isfinite(cost).all():  # scipy would say only "matrix contains invalid numeric entries"
            raise ValueError(
                "the matching costs are not finite: pred_logits or pred_boxes hold NaN or infinity (a diverged model)"
            )
        sizes = [len(target["boxes"]) for target in targets]
        indices = [linear_sum_assignment(image_cost[image]) for image, image_cost in enumerate(cost.split(sizes, -1))]
        return [
            (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(columns, dtype=torch.int64))
            for rows, columns in indices
        ]


def build_matcher(cfg: Config) -> HungarianMatcher:
    return HungarianMatcher(
        cost_class=cfg.set_cost_class,
        cost_bbox=cfg.set_cost_bbox,
        cost_giou=cfg.set_cost_giou,
        focal_alpha=cfg.focal_alpha,
    )
