"""Synthetic shapes: a small detection set in the COCO layout that a detector can learn on a CPU in minutes.

    python -m datasets.shapes --out data/shapes --num-train 2000 --num-val 200 --seed 0 [--size 128] [--workers 2]

writes ``OUT/train2017/*.png``, ``OUT/val2017/*.png`` and ``OUT/annotations/instances_{train,val}2017.json``.
Five classes told apart by their outline (category ids 1..5: circle, square, triangle, star, cross, so train with
``num_classes >= 6``), one to ``--max-objects`` (4) per image (a few images have none), 15-45 % of the image
side, in random colours with solid, striped or noisy fill, rotated, partly overlapping, on gradient or blotchy
noisy backgrounds. Images are ``0.75 * size`` to ``size`` pixels on each side. The same seed gives byte-identical
files (with the same numpy and Pillow): every image draws from its own generator seeded by
``(seed, split, index)``, so the first N images do not depend on how many follow.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from util.atomic_write import atomic_write, write_json

CATEGORY_NAMES = ("circle", "square", "triangle", "star", "cross")
SPLITS = ("train", "val")
MAX_OBJECTS = 4
EMPTY_IMAGE_PROBABILITY = 0.05
SIZE_RANGE = (0.15, 0.45)  # object extent as a fraction of the image's shorter side
MAX_OVERLAP = 0.3  # intersection over the smaller box, between any two objects
SUPERSAMPLE = 4  # shapes are rasterised at 4x and averaged down for smooth edges


def _outline(name: str, rng: np.random.Generator) -> np.ndarray | None:
    """Vertices (K, 2) of shape ``name`` around the origin, extent about [-1, 1]; None for the circle."""
    if name == "circle":
        return None
    if name == "square":
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.8
        angle = rng.uniform(-0.4, 0.4)
    elif name == "triangle":
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        corners = np.stack([np.cos(angles), -np.sin(angles)], -1)
        angle = rng.uniform(0, 2 * np.pi)
    elif name == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        corners = np.stack([radii * np.cos(angles), -radii * np.sin(angles)], -1)
        angle = rng.uniform(0, 2 * np.pi)
    elif name == "cross":
        arm = 0.3
        corners = np.array(
            [
                [-arm, -1],
                [arm, -1],
                [arm, -arm],
                [1, -arm],
                [1, arm],
                [arm, arm],
                [arm, 1],
                [-arm, 1],
                [-arm, arm],
                [-1, arm],
                [-1, -arm],
                [-arm, -arm],
            ],
            dtype=np.float64,
        )
        angle = rng.uniform(-0.4, 0.4)
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {CATEGORY_NAMES}")
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return corners @ rotation.T


def _shape_alpha(name: str, rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[float]]:
    """Coverage (H, W) in [0, 1] of one randomly sized and placed shape, and its box ``[x, y, w, h]``."""
    extent = rng.uniform(*SIZE_RANGE) * min(height, width)
    stretch = rng.uniform(0.85, 1.15) if name != "circle" else 1.0
    half = np.array([extent / 2 * stretch, extent / 2 / stretch])
    outline = _outline(name, rng)
    points = outline * half if outline is not None else None
    low = points.min(0) if points is not None else -half
    high = points.max(0) if points is not None else half
    centre = np.array([rng.uniform(-low[0], width - high[0]), rng.uniform(-low[1], height - high[1])])
    mask = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    if points is None:
        corner0, corner1 = (centre - half) * SUPERSAMPLE, (centre + half) * SUPERSAMPLE
        draw.ellipse([float(corner0[0]), float(corner0[1]), float(corner1[0]), float(corner1[1])], fill=255)
    else:
        draw.polygon([(float(x), float(y)) for x, y in (points + centre) * SUPERSAMPLE], fill=255)
    mask = mask.resize((width, height), Image.BOX)
    x0, y0 = centre + low
    box_w, box_h = high - low
    return np.asarray(mask, dtype=np.float64) / 255.0, [float(x0), float(y0), float(box_w), float(box_h)]


def _overlap(box_a: list[float], box_b: list[float]) -> float:
    """Intersection over the smaller of two ``[x, y, w, h]`` boxes."""
    inter_w = min(box_a[0] + box_a[2], box_b[0] + box_b[2]) - max(box_a[0], box_b[0])
    inter_h = min(box_a[1] + box_a[3], box_b[1] + box_b[3]) - max(box_a[1], box_b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    return inter_w * inter_h / min(box_a[2] * box_a[3], box_b[2] * box_b[3])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float: a linear gradient between two colours, or smooth blotches, plus pixel noise."""
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = start + ramp[..., None] * (end - start)
    else:
        coarse = rng.uniform(0, 255, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64)
    return image + rng.normal(0, rng.uniform(2, 12), (height, width, 1))


def _fill(rng: np.random.Generator, height: int, width: int, avoid: np.ndarray) -> np.ndarray:
    """(H, W, 3) float texture of an object: solid, striped or noisy, in a colour far from ``avoid`` (3,)."""
    colours = rng.uniform(0, 255, (8, 3))
    colour = colours[np.argmax(np.abs(colours - avoid).sum(1))]
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(colour, (height, width, 3)).copy()
    if kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
        ys, xs = np.mgrid[0:height, 0:width]
        stripes = (np.floor((xs * math.cos(angle) + ys * math.sin(angle)) / (period / 2)) % 2)[..., None]
        return colour * (1 - 0.45 * stripes)
    return colour + rng.normal(0, 25, (height, width, 3))


def render_image(
    rng: np.random.Generator, height: int, width: int, max_objects: int = MAX_OBJECTS
) -> tuple[np.ndarray, list[dict]]:
    """One (H, W, 3) uint8 image and its 1..``max_objects`` objects (none in a few images)
    ``{"category_id", "bbox": [x, y, w, h], "area"}``; ``area`` is the shape's own, occluded parts included."""
    image = _background(rng, height, width)
    count = 0 if rng.random() < EMPTY_IMAGE_PROBABILITY else int(rng.integers(1, max_objects + 1))
    objects: list[dict] = []
    for _ in range(count):
        for _attempt in range(20):
            category = int(rng.integers(len(CATEGORY_NAMES)))
            alpha, box = _shape_alpha(CATEGORY_NAMES[category], rng, height, width)
            if all(_overlap(box, other["bbox"]) <= MAX_OVERLAP for other in objects):
                break
        else:
            continue
        inside = alpha > 0.5
        texture = _fill(rng, height, width, image[inside].mean(0) if inside.any() else image.mean((0, 1)))
        image = image * (1 - alpha[..., None]) + texture * alpha[..., None]
        objects.append(
            {
                "category_id": category + 1,
                "bbox": [round(value, 2) for value in box],
                "area": round(float(alpha.sum()), 2),
            }
        )
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _write_image(
    folder: Path, split: str, index: int, seed: int, size: int, image_format: str, max_objects: int
) -> tuple[dict, list[dict]]:
    """Draw image ``index`` of ``split`` from its own generator, write it to ``folder``; -> its COCO image entry
    and its objects (without annotation ids)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    low = max(1, round(0.75 * size))
    height, width = int(rng.integers(low, size + 1)), int(rng.integers(low, size + 1))
    pixels, objects = render_image(rng, height, width, max_objects)
    image_id = index + 1
    file_name = f"{image_id:012d}.{image_format}"
    options = {"format": "JPEG", "quality": 95} if image_format == "jpg" else {"format": "PNG"}
    with atomic_write(folder / file_name, "wb") as file:
        Image.fromarray(pixels).save(file, **options)
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}, objects


def generate_split(
    out: Path,
    split: str,
    num_images: int,
    seed: int,
    size: int,
    image_format: str = "png",
    max_objects: int = MAX_OBJECTS,
    workers: int = 1,
) -> dict:
    """Write ``num_images`` images to ``out/{split}2017/`` (drawn by ``workers`` processes: the same files for any
    number) and return the split's COCO annotation dict."""
    folder = out / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder, split, index, seed, size, image_format, max_objects) for index in range(num_images)]
    if workers > 1 and num_images > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, num_images)) as pool:
            rendered = pool.starmap(_write_image, jobs, chunksize=max(1, num_images // (4 * workers)))
    else:
        rendered = [_write_image(*job) for job in jobs]
    images, annotations = [], []
    for image, objects in rendered:
        images.append(image)
        for item in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "iscrowd": 0, **item})
    categories = [
        {"id": index + 1, "name": name, "supercategory": "shape"} for index, name in enumerate(CATEGORY_NAMES)
    ]
    info = {"description": f"synthetic shapes, {split} split, seed {seed}", "version": "1.0"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def generate_shapes_dataset(
    out: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    size: int = 128,
    image_format: str = "png",
    max_objects: int = MAX_OBJECTS,
    workers: int = 1,
) -> Path:
    """Write the train and val splits in the COCO layout under ``out`` with ``workers`` processes; returns ``out``."""
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in zip(SPLITS, (num_train, num_val)):
        annotation = generate_split(out, split, count, seed, size, image_format, max_objects, workers)
        write_json(out / "annotations" / f"instances_{split}2017.json", annotation)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (COCO layout)")
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--num-val", type=int, default=200, help="validation images")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    parser.add_argument("--size", type=int, default=128, help="largest image side in pixels")
    parser.add_argument("--max-objects", type=int, default=MAX_OBJECTS, help="most objects in one image")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images (the same files for any)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = generate_shapes_dataset(
        args.out,
        args.num_train,
        args.num_val,
        args.seed,
        args.size,
        args.image_format,
        args.max_objects,
        args.workers,
    )
    print(f"wrote {args.num_train} train and {args.num_val} val images of at most {args.size} px to {out}")


if __name__ == "__main__":
    main()
