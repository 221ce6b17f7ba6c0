"""Time the paper's transform pipelines on a COCO-sized image: ``python -m benchmarks.transforms``.

Prints a markdown table of milliseconds per image for the training pipeline, the validation pipeline and each
training step alone: the fastest of ``--repeats`` rounds of ``--calls`` calls each, in one thread as one
``DataLoader`` worker runs them, timed in CPU time of this process (``time.process_time``), which other processes
on a shared machine disturb far less than wall time. The image is 480 x 640 with 10 boxes, the
size of a typical COCO image.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from datasets import transforms as T


def sample(height: int = 480, width: int = 640, num_boxes: int = 10) -> tuple[Image.Image, dict]:
    """A random RGB image and target in the form ``CocoDetection`` hands to its transforms."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    corners = rng.uniform(0, 1, (num_boxes, 2, 2)) * np.array([width, height])
    boxes = torch.tensor(np.concatenate([corners.min(1), corners.max(1)], 1), dtype=torch.float32)
    target = {
        "boxes": boxes,
        "labels": torch.arange(num_boxes),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(num_boxes, dtype=torch.int64),
        "image_id": torch.tensor(1),
        "orig_size": torch.tensor([height, width]),
        "size": torch.tensor([height, width]),
    }
    return image, target


def milliseconds_per_call(transform: Callable, image, target, calls: int, repeats: int) -> float:
    torch.manual_seed(0)
    rounds = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            transform(image, target)
        rounds.append((time.process_time() - start) / calls * 1000)
    return min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    image, target = sample()
    tensor, tensor_target = T.ToTensor()(image, target)
    cases = [
        ("train pipeline (paper defaults)", T.build_transforms("train"), image),
        ("val pipeline (800, max 1333)", T.build_transforms("val"), image),
        ("RandomHorizontalFlip(p=1)", T.RandomHorizontalFlip(1.0), image),
        ("RandomResize([800], 1333)", T.RandomResize([800], 1333), image),
        ("RandomSizeCrop(384, 600)", T.RandomSizeCrop(384, 600), image),
        ("ToTensor", T.ToTensor(), image),
        ("Normalize", T.Normalize(), tensor),
    ]
    print("| transform | ms per 480x640 image |")
    print("|---|---:|")
    for name, transform, first in cases:
        inputs = (first, tensor_target if first is tensor else target)
        print(f"| {name} | {milliseconds_per_call(transform, *inputs, args.calls, args.repeats):.2f} |")


if __name__ == "__main__":
    main()
