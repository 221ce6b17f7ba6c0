"""Detect objects in image files, write the detections as JSON and each image with its boxes drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from datasets import Batch, collate_detection
from datasets.transforms import Compose
from engine.data import (
    build_config_transforms,
)
from engine.evaluation import detect
from engine.runtime import build_model_on, load_for_inference, say
from util.atomic_write import atomic_write, write_json
from util.config import Config
from util.distributed import (
    init_distributed,
)
from util.draw import class_name, draw_detections
from util.errors import RunError, UserError
from util.image_io import read_rgb_image

PREDICTIONS_FILE = "predictions.json"


def load_image(path: str | Path) -> Image.Image:
    """The RGB image at ``path``, read by :func:`util.image_io.read_rgb_image` (its docstring says what each
    Pillow mode becomes); a ``UserError`` names the file when it cannot be read."""
    return read_rgb_image(path)


def prepare(image: Image.Image, transforms: Compose) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``image`` through the evaluation ``transforms``, with the target fields the evaluation reads."""
    size = torch.tensor([image.height, image.width], dtype=torch.int64)
    target = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "orig_size": size,
        "size": size.clone(),
    }
    return transforms(image, target)


def predict_files(
    model: nn.Module,
    postprocess: nn.Module,
    paths: Sequence[str | Path],
    transforms: Compose,
    device: torch.device,
    out_dir: str | Path,
    names: Mapping[int, str] | None = None,
    threshold: float = 0.5,
    amp: str = "none",
) -> tuple[list[dict], dict[str, str]]:
    """Detect in every image of ``paths`` (one at a time), keep detections scoring at least ``threshold``, and
    write ``out_dir/predictions.json`` and ``out_dir/<index>_<name>.png`` per image with the boxes drawn.

    An image that cannot be read is skipped and the others are still written. Returns, per image written,
    ``{"file", "detections": [{"label", "name", "score", "box": [x0, y0, x1, y1]}]}``, and the skipped files with
    the reason, ``{path: reason}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    results, failures = [], {}
    for index, path in enumerate(paths):
        try:
            image = load_image(path)
        except (OSError, UserError) as error:  # a missing, unreadable or unsupported image
            failures[str(path)] = str(error.__cause__ or error)
            continue
        batch: Batch = collate_detection([prepare(image, transforms)]).to(device)
        found = detect(model, postprocess, batch, amp)[0]
        keep = found["scores"] >= threshold
        boxes, labels, scores = found["boxes"][keep], found["labels"][keep], found["scores"][keep]
        detections = [
            {
                "label": int(label),
                "name": class_name(names, int(label)),
                "score": round(float(score), 4),
                "box": [round(float(value), 2) for value in box],
            }
            for box, label, score in zip(boxes, labels, scores)
        ]
        results.append({"file": str(path), "detections": detections})
        drawn = draw_detections(image, boxes.tolist(), labels.tolist(), scores.tolist(), names)
        with atomic_write(out_dir / f"{index:03d}_{Path(path).stem}.png", "wb") as file:
            drawn.save(file, format="PNG")
    write_json(out_dir / PREDICTIONS_FILE, results, indent=1)
    return results, failures


class PredictionError(RunError):
    """Some images could not be predicted; the others were written. ``results``: those written."""

    def __init__(self, message: str, results: list[dict]):
        super().__init__(message)
        self.results = results


def predict(cfg: Config, images: Sequence[str | Path], out_dir: str | Path, threshold: float = 0.5) -> list[dict]:
    """Detect in ``images`` with ``cfg.resume`` and write ``out_dir/predictions.json`` and the drawn images.

    An image that cannot be read is skipped; the others are written, then a :class:`PredictionError` names the
    skipped ones and why (``main.py`` prints it and exits with status 1).
    """
    info = init_distributed(cfg.device, cfg.dist_timeout_minutes)
    model, _, postprocessors = build_model_on(cfg, info)
    model, checkpoint, amp = load_for_inference(cfg, "predict", model, info)
    names = checkpoint.get("category_names")
    results, failures = predict_files(
        model,
        postprocessors["bbox"],
        images,
        build_config_transforms("val", cfg),
        info.device,
        out_dir,
        names,
        threshold,
        amp,
    )
    for result in results:
        found = ", ".join(f"{d['name']} {d['score']:.2f}" for d in result["detections"]) or "nothing"
        say(info, f"{result['file']}: {found}")
    say(info, f"wrote {len(results)} drawn image(s) and predictions.json to {out_dir}")
    if failures:
        listed = "; ".join(f"{path}: {reason}" for path, reason in failures.items())
        raise PredictionError(
            f"{len(failures)} of {len(images)} image(s) could not be predicted ({listed}); the other "
            f"{len(results)} are in {Path(out_dir) / PREDICTIONS_FILE}",
            results,
        )
    return results
