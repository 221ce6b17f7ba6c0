"""Turn the detector's outputs into scored, labelled boxes in image pixels."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Keep the ``num_detections`` highest sigmoid scores over all (query, class) pairs of each image.

    A query can thus appear with several classes, as in the original.
    """

    def __init__(self, num_detections: int = 100) -> None:
        super().__init__()
        self.num_detections = num_detections

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Score, label and scale the detections.

        Args:
            outputs: ``pred_logits`` (B, Q, num_classes), ``pred_boxes`` (B, Q, 4) cx, cy, w, h in [0, 1].
            target_sizes: (B, 2) each image's (height, width) in pixels.

        Returns:
            B dicts: ``scores`` (K,), ``labels`` (K,) int64, ``boxes`` (K, 4) x0, y0, x1, y1 in pixels, by
            descending score; K = min(num_detections, Q * num_classes).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (B, 2) = ({logits.shape[0]}, 2), got {tuple(target_sizes.shape)}")
        batch, queries, num_classes = logits.shape
        probabilities = logits.sigmoid().view(batch, -1)
        scores, indices = torch.topk(probabilities, min(self.num_detections, queries * num_classes), dim=1)
        query_index = torch.div(indices, num_classes, rounding_mode="floor")
        labels = indices % num_classes
        boxes = box_convert(boxes, "cxcywh", "xyxy")
        boxes = torch.gather(boxes, 1, query_index[..., None].expand(-1, -1, 4))
        height, width = target_sizes.unbind(1)
        scale = torch.stack([width, height, width, height], 1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        return [
            {"scores": image_scores, "labels": image_labels, "boxes": image_boxes}
            for image_scores, image_labels, image_boxes in zip(scores, labels, boxes)
        ]
