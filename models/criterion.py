"""The set criterion of Deformable DETR: match, then sigmoid focal, L1 and GIoU losses on the matched pairs.

Computed as the original computes it (normalisations, the cardinality quirk, the two-stage class-agnostic
encoder loss), so that its recipes and loss curves transfer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from models.matcher import HungarianMatcher, build_matcher
from util.config import Config

Indices = list[tuple[torch.Tensor, torch.Tensor]]


class SetCriterion(nn.Module):
    """Losses ``loss_ce``, ``loss_bbox``, ``loss_giou`` of the final predictions, with suffix ``_i`` for decoder
    layer i's auxiliary predictions and ``_enc`` for the two-stage proposals; ``class_error`` and
    ``cardinality_error`` (with the same suffixes) are logged, not weighted.

    Args:
        num_classes: classes of the sigmoid classifier.
        matcher: assigns predictions to targets.
        weight_dict: loss name -> weight; the total loss is ``sum(weight_dict[k] * losses[k])``.
        focal_alpha: alpha of the sigmoid focal loss (gamma 2).
    """

    def __init__(
        self, *, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float], focal_alpha: float = 0.25
    ) -> None:
        super().__init__()
        self.num_classes, self.matcher, self.focal_alpha = num_classes, matcher, focal_alpha
        self.weight_dict = weight_dict

    def forward(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Every loss of ``outputs`` (see ``DeformableDETR.forward``) against ``targets``: B dicts with ``labels``
        (n_i,) int64 and ``boxes`` (n_i, 4) cx, cy, w, h normalised. Returns name -> scalar tensor."""
        for index, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"targets[{index}]['labels'] must lie in [0, num_classes={self.num_classes}), "
                    f"got values from {int(labels.min())} to {int(labels.max())}"
                )
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)
        losses = self._losses(outputs, targets, num_boxes, suffix="", log=True)
        for index, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses(aux_outputs, targets, num_boxes, suffix=f"_{index}", log=False))
        if "enc_outputs" in outputs:
            # Proposals are class-agnostic: every target is class 0.
            binary_targets = [{**target, "labels": torch.zeros_like(target["labels"])} for target in targets]
            losses.update(self._losses(outputs["enc_outputs"], binary_targets, num_boxes, suffix="_enc", log=False))
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum(weight_dict[k] * losses[k]) over the weighted losses."""
        return sum(losses[name] * weight for name, weight in self.weight_dict.items() if name in losses)

    def _losses(
        self, outputs: dict, targets: list[dict], num_boxes: float, suffix: str, log: bool
    ) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {
            **self.loss_labels(outputs, targets, indices, num_boxes, log),
            **self.loss_cardinality(outputs, targets),
            **self.loss_boxes(outputs, targets, indices, num_boxes),
        }
        return {name + suffix: value for name, value in losses.items()}

    def loss_labels(
        self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float, log: bool
    ) -> dict[str, torch.Tensor]:
        """Sigmoid focal loss over all queries and classes, matched queries' targets one-hot, others all zero."""
        logits = outputs["pred_logits"]
        batch_index, query_index = _matched_queries(indices)
        matched_labels = torch.cat([target["labels"][columns] for target, (_, columns) in zip(targets, indices)])
        one_hot = torch.zeros_like(logits)
        one_hot[batch_index, query_index, matched_labels] = 1
        # The original's normalisation: mean over classes, sum over queries and images, / num_boxes, * Q.
        focal = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=2, reduction="none")
        losses = {"loss_ce": focal.mean(1).sum() / num_boxes * logits.shape[1]}
        if log:
            losses["class_error"] = 100 - _top1_accuracy(logits[batch_index, query_index], matched_labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Logged only: |predicted count - target count|, a query counting when its best class is not the last
        (the original's rule, inherited from DETR's softmax "no object" class)."""
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(target["labels"]) for target in targets], device=logits.device)
        predicted_counts = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_counts.float(), target_counts.float())}

    def loss_boxes(
        self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float
    ) -> dict[str, torch.Tensor]:
        """L1 and 1 - GIoU of the matched boxes, each summed and divided by num_boxes."""
        batch_index, query_index = _matched_queries(indices)
        pred_boxes = outputs["pred_boxes"][batch_index, query_index]
        target_boxes = torch.cat([target["boxes"][columns] for target, (_, columns) in zip(targets, indices)])
        loss_bbox = F.l1_loss(pred_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        )
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    @staticmethod
    def _num_boxes(targets: list[dict], device: torch.device) -> float:
        """Targets per process, averaged over processes, at least 1."""
        num_boxes = torch.tensor([float(sum(len(target["labels"]) for target in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()


def _matched_queries(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, query index) of every matched prediction, image after image."""
    batch_index = torch.cat([torch.full_like(rows, image) for image, (rows, _) in enumerate(indices)])
    query_index = torch.cat([rows for rows, _ in indices])
    return batch_index, query_index


def _top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of rows whose best class is the label; 0 when there are none (as the original)."""
    if labels.numel() == 0:
        return torch.zeros((), device=logits.device)
    return (logits.argmax(-1) == labels).float().mean() * 100


def build_weight_dict(cfg: Config) -> dict[str, float]:
    """Loss weights: the final predictions', every auxiliary decoder layer's (``_i``), the proposals' (``_enc``)."""
    final = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    weight_dict = dict(final)
    suffixes = [f"_{index}" for index in range(cfg.dec_layers - 1)] if cfg.aux_loss else []
    suffixes += ["_enc"] if cfg.two_stage else []
    for suffix in suffixes:
        weight_dict.update({name + suffix: weight for name, weight in final.items()})
    return weight_dict


def build_criterion(cfg: Config) -> SetCriterion:
    return SetCriterion(
        num_classes=cfg.num_classes,
        matcher=build_matcher(cfg),
        weight_dict=build_weight_dict(cfg),
        focal_alpha=cfg.focal_alpha,
    )
