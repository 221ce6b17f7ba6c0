"""COCO-format data, transforms, batching, COCO evaluation and the synthetic shapes generator.

dataset = build_dataset("train", coco_path, build_transforms("train"), num_classes=91)
loader = DataLoader(dataset, batch_size=2, collate_fn=collate_detection)   # -> Batch(images, padding_mask, targets)
evaluator = CocoEvaluator(val_dataset.coco, val_dataset.label_to_category_id)
"""

from datasets.coco import CocoDetection, build_dataset
from datasets.coco_eval import METRIC_NAMES, CocoEvaluator, merge_detections
from datasets.collate import Batch, collate_detection
from datasets.transforms import build_transforms

__all__ = [
    "METRIC_NAMES",
    "Batch",
    "CocoDetection",
    "CocoEvaluator",
    "build_dataset",
    "build_transforms",
    "collate_detection",
    "merge_detections",
]
