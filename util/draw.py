"""Draw detections on an image: a box, the class name and the score for each."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

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
    ``name score``; ``names`` maps labels to class names (missing: ``class N``). Images whose shorter side is below
    ``min_side`` are enlarged first (boxes with them), so that small images stay readable."""
    scale = max(1.0, min_side / min(image.size))
    canvas = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=max(12, min(canvas.size) // 32))  # Pillow >= 10.1: scalable
    except TypeError:
        font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    for box, label, score in zip(boxes, labels, scores):
        colour = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (float(value) * scale for value in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        caption = f"{class_name(names, int(label))} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), caption, font=font)
        caption_top = max(0.0, y0 - (bottom - top) - 2)
        draw.rectangle((x0, caption_top, x0 + right - left + 2, caption_top + bottom - top + 2), fill=colour)
        draw.text((x0 + 1, caption_top + 1 - (top - y0)), caption, fill=(255, 255, 255), font=font)
    return canvas
