"""Tiny hand-written COCO-layout datasets for the datasets tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
IMAGES = [
    {"id": 7, "file_name": "a.png", "height": 20, "width": 30},
    {"id": 8, "file_name": "b.png", "height": 24, "width": 16},
    {"id": 9, "file_name": "c.png", "height": 12, "width": 12},  # no annotations
]
ANNOTATIONS = [
    {"id": 101, "image_id": 7, "category_id": 1, "bbox": [2, 3, 10, 5], "area": 50.0, "iscrowd": 0},
    {"id": 102, "image_id": 7, "category_id": 3, "bbox": [25, 10, 10, 4], "area": 40.0, "iscrowd": 0},  # clipped
    {"id": 103, "image_id": 8, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64.0, "iscrowd": 1},  # crowd
    {"id": 104, "image_id": 8, "category_id": 1, "bbox": [4, 4, 0, 6], "area": 0.0, "iscrowd": 0},  # w = 0
    {"id": 105, "image_id": 8, "category_id": 3, "bbox": [40, 2, 5, 5], "area": 25.0, "iscrowd": 0},  # outside
    {"id": 106, "image_id": 8, "category_id": 3, "bbox": [0, 12, 16, 12], "area": 150.0, "iscrowd": 0},
]


def annotation_dict() -> dict:
    """A fresh copy of the tiny annotation file's content, for tests to break."""
    return copy.deepcopy({"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES})


def write_coco(root: Path, data: dict | None = None, image_set: str = "train", seed: int = 0) -> Path:
    """Write ``data`` (default :func:`annotation_dict`) and a random image for each of its well-formed image
    entries inside the image folder under ``root`` in the COCO layout; returns the annotation file."""
    data = annotation_dict() if data is None else data
    rng = np.random.default_rng(seed)
    folder = root / f"{image_set}2017"
    folder.mkdir(parents=True, exist_ok=True)
    for image in data.get("images", []):
        try:
            size = (int(image["height"]), int(image["width"]), 3)
            path = folder / image["file_name"]
            if not path.resolve().is_relative_to(folder.resolve()):
                continue  # a file name pointing outside the folder: never write there
            pixels = rng.integers(0, 256, size, dtype=np.uint8)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
        except (KeyError, TypeError, ValueError):
            continue  # a deliberately malformed entry
    annotation_file = root / "annotations" / f"instances_{image_set}2017.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(data))
    return annotation_file
