"""COCO bbox evaluation with pycocotools, over detections collected per image id.

Detections of one image are a dict ``boxes`` (n, 4) ``x0, y0, x1, y1`` in pixels of the original image,
``scores`` (n,), ``labels`` (n,) int. Keyed by image id they collapse duplicates: an image that a padded
``DistributedSampler`` gave to two ranks is counted once after gathering every rank's dict and merging them with
:func:`merge_detections` (or feeding each to :meth:`CocoEvaluator.update`)::

    evaluator = CocoEvaluator(val_dataset.coco, val_dataset.label_to_category_id)
    for batch in loader:                                    # on every rank
        evaluator.update({int(target["image_id"]): found for target, found in zip(batch.targets, detections)})
    parts = [None] * world_size
    torch.distributed.all_gather_object(parts, evaluator.detections)
    if rank == 0:
        evaluator.detections = merge_detections(parts)
        metrics = evaluator.evaluate(output_path=output_dir / "detections.json")
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.atomic_write import write_json

# The order of COCOeval.stats.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

Detections = Mapping[str, "torch.Tensor | np.ndarray"]


def _to_numpy(image_id: int, detections: Detections) -> dict[str, np.ndarray]:
    arrays = {}
    for key in ("boxes", "scores", "labels"):
        if key not in detections:
            raise ValueError(f"detections of image id {image_id} lack {key!r}")
        value = detections[key]
        arrays[key] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    count = len(arrays["scores"])
    arrays["boxes"] = arrays["boxes"].astype(np.float64).reshape(-1, 4)
    if len(arrays["boxes"]) != count or len(arrays["labels"]) != count:
        raise ValueError(
            f"detections of image id {image_id}: boxes {arrays['boxes'].shape}, scores ({count},) "
            f"and labels {arrays['labels'].shape} must have the same length"
        )
    return arrays


def merge_detections(parts: Iterable[Mapping[int, Detections]]) -> dict[int, dict[str, np.ndarray]]:
    """One ``{image_id: detections}`` from several (e.g. one per rank); an image id seen twice keeps its last
    detections, so each image counts once."""
    merged: dict[int, dict[str, np.ndarray]] = {}
    for part in parts:
        for image_id, detections in part.items():
            merged[int(image_id)] = _to_numpy(int(image_id), detections)
    return merged


def to_coco_results(
    detections: Mapping[int, Detections], label_to_category_id: Mapping[int, int] | None = None
) -> list[dict]:
    """COCO results format: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per box, ordered by
    image id. Labels are mapped to category ids (identity when ``label_to_category_id`` is None); boxes whose
    label has no category are left out."""
    results = []
    for image_id in sorted(detections):
        arrays = _to_numpy(image_id, detections[image_id])
        for box, score, label in zip(arrays["boxes"], arrays["scores"], arrays["labels"]):
            label = int(label)
            if label_to_category_id is not None and label not in label_to_category_id:
                continue
            category_id = label if label_to_category_id is None else int(label_to_category_id[label])
            x0, y0, x1, y1 = (float(value) for value in box)
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": category_id,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
    return results


def evaluate_results(
    coco_gt: COCO, results: list[dict], image_ids: Iterable[int] | None = None, verbose: bool = False
) -> tuple[dict[str, float], str]:
    """Run COCOeval (bbox) over ``image_ids`` (None: every ground-truth image). Returns the metrics of
    :data:`METRIC_NAMES` (-1 where the ground truth has no box in that area range, as pycocotools) and the
    printed summary; all zeros when there is no detection (pycocotools cannot load an empty result list)."""
    if not results:
        return dict.fromkeys(METRIC_NAMES, 0.0), "no detections: every metric is 0"
    known_ids = set(coco_gt.getImgIds())
    unknown = sorted({result["image_id"] for result in results} - known_ids)
    if unknown:
        raise ValueError(f"detections name image ids {unknown[:10]} that the ground truth does not have")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_dt = coco_gt.loadRes([dict(result) for result in results])  # loadRes adds keys to what it gets
        evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluation.params.imgIds = sorted(int(image_id) for image_id in image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluation.summarize()
    if verbose:
        print(printed.getvalue() + summary.getvalue(), end="")
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluation.stats)}, summary.getvalue()


class CocoEvaluator:
    """Collects detections per image id and evaluates them against ``coco_gt``.

    Args:
        coco_gt: ground truth, e.g. ``CocoDetection.coco``.
        label_to_category_id: model label -> category id (None: the label is the category id).

    Only the images given to :meth:`update` (with or without detections) are evaluated, so a run over part of a
    split reports on that part.
    """

    def __init__(self, coco_gt: COCO, label_to_category_id: Mapping[int, int] | None = None) -> None:
        self.coco_gt = coco_gt
        self.label_to_category_id = dict(label_to_category_id) if label_to_category_id is not None else None
        self.detections: dict[int, dict[str, np.ndarray]] = {}
        self.summary = ""

    def update(self, detections: Mapping[int, Detections]) -> None:
        """Add ``{image_id: detections}``; an image id already present is replaced, never counted twice."""
        self.detections.update(merge_detections([detections]))

    def results(self) -> list[dict]:
        """The detections in COCO results format with original category ids."""
        return to_coco_results(self.detections, self.label_to_category_id)

    def evaluate(self, output_path: str | Path | None = None, verbose: bool = False) -> dict[str, float]:
        """COCOeval over the images seen so far -> ``{"AP": ..., "ARl": ...}`` (:data:`METRIC_NAMES`);
        ``output_path``: also write the results there as JSON (``detections.json``). The printed pycocotools
        summary is kept in :attr:`summary`."""
        results = self.results()
        if output_path is not None:
            write_json(output_path, results)  # whole or not at all
        metrics, self.summary = evaluate_results(self.coco_gt, results, self.detections.keys(), verbose)
        return metrics
