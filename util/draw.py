"""Draw detections on an image: a box, the class name and the score for each (``torchvision.utils``'s
``draw_bounding_boxes``, in a fixed colour per class and a font that scales with the image)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from util.image_io import to_rgb

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
)
# A scalable font that is always installed with matplotlib; torchvision's default bitmap font cannot grow.
FONT_FILE = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
# torchvision >= 0.23 fills the caption's background with the box colour; older versions draw the text only.
FILLS_LABELS = "fill_labels" in inspect.signature(draw_bounding_boxes).parameters


def class_name(names: Mapping[int, str] | None, label: int) -> str:
    """``names[label]``, or ``class N`` when there is none."""
    return names.get(label, f"class {label}") if names is not None else f"class {label}"


def draw_detections(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    scores: Sequence[float],
    names: Mapping[int, str] | None = None,
    min_side: int = 512,
) -> Image.Image:
    """A copy of ``image`` with each box (``x0, y0, x1, y1`` pixels) outlined in its label's colour and captioned
    ``name score`` inside its top-left corner; ``names`` maps labels to class names (missing: ``class N``). Images
    whose shorter side is below ``min_side`` are enlarged first (boxes with them), so that small images stay
    readable. ``image`` in any mode is read as :func:`util.image_io.to_rgb` says."""
    scale = max(1.0, min_side / min(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    canvas = to_rgb(image).resize(size, Image.NEAREST)
    if len(boxes) == 0:
        return canvas
    captions = [f"{class_name(names, int(label))} {float(score):.2f}" for label, score in zip(labels, scores)]
    caption_style = {"fill_labels": True, "label_colors": "white"} if FILLS_LABELS else {}
    drawn = draw_bounding_boxes(
        F.pil_to_tensor(canvas),
        torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale,
        labels=captions,
        colors=[PALETTE[int(label) % len(PALETTE)] for label in labels],
        width=max(1, round(min(size) / 200)),
        font=str(FONT_FILE),
        font_size=max(12, min(size) // 32),
        **caption_style,
    )
    return F.to_pil_image(drawn)
