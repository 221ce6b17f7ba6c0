"""Read an image file as 8-bit RGB: the one place where the training, evaluation, prediction and visualization code
opens images, so that every mode Pillow can produce is decided once.

What each Pillow mode becomes (:func:`to_rgb`):

- ``RGB``: unchanged.
- ``1``, ``L``, ``RGBX``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's own conversion (exact for these; grey -> R = G = B).
- ``CMYK``: Pillow's conversion (``R = 255 - C - K`` clipped and so on); an embedded ICC profile is not applied,
  so print-oriented colours come out approximately. ICC profiles are ignored for every mode, as torchvision and
  the original Deformable DETR do.
- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey, e.g. 16-bit PNG): scaled to 8 bits,
  ``round(value * 255 / 65535)``, then grey. Pillow's own ``convert("RGB")`` clips every value above 255 to
  white instead; that is why this module exists.
- ``I`` (32-bit signed integer grey, e.g. some TIFFs): read as 16-bit grey when every value lies in
  ``0..65535``; otherwise refused (there is no standard range to scale from).
- ``F`` (32-bit float grey): refused. Float images have no standard range (Pillow's own convention is 0..255,
  scientific TIFFs often use 0..1), so any choice would silently darken or whiten some of them.
- ``LA``, ``La``, ``RGBA``, ``RGBa``, ``PA`` and ``P`` with a transparent colour: composited over a white
  background, which is how most viewers show them (dropping the alpha channel instead would expose whatever
  colour happens to be stored under transparent pixels). Fully opaque images come out as if alpha were dropped.
- ``P`` without transparency: its palette colours.
- Any other mode: refused.

Multi-frame files (GIF, TIFF, APNG) give their first frame. The EXIF orientation tag is not applied: boxes, and
COCO annotations, refer to the stored pixel grid. Unreadable, truncated, missing, oversized (Pillow's decompression
bomb limit) and refused files raise :class:`util.errors.UserError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from util.errors import UserError

SIXTEEN_BIT_MAX = 65535
ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
CONVERTED_MODES = ("1", "L", "P", "RGBX", "YCbCr", "LAB", "HSV", "CMYK")
BACKGROUND = (255, 255, 255)


def _sixteen_bit_to_grey(image: Image.Image, name: str) -> Image.Image:
    """A 16-bit (``I;16*``) or 32-bit integer (``I``) grey image -> ``L``, scaling ``0..65535`` to ``0..255``."""
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > SIXTEEN_BIT_MAX):
        raise UserError(
            f"cannot read image {name}: integer pixels range over {values.min()}..{values.max()}, "
            f"outside the 16-bit range 0..{SIXTEEN_BIT_MAX} that can be scaled to 8 bits; "
            "save the image as 8-bit or 16-bit PNG"
        )
    scaled = (values.astype(np.uint32) * 255 + SIXTEEN_BIT_MAX // 2) // SIXTEEN_BIT_MAX  # round(v * 255 / 65535)
    return Image.fromarray(scaled.astype(np.uint8))


def _composite_on_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """``image`` in any mode -> an 8-bit ``RGB`` image of the same size, by the table in this module's docstring.

    Args:
        image: a PIL image (loaded or not).
        name: how error messages call the image (its path).

    Raises:
        UserError: the mode is refused (``F``, ``I`` outside ``0..65535``, unknown modes).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_bit_to_grey(image, name).convert("RGB")
    if mode in ALPHA_MODES or (mode == "P" and image.has_transparency_data):
        return _composite_on_background(image)
    if mode in CONVERTED_MODES:
        return image.convert("RGB")
    if mode == "F":
        raise UserError(
            f"cannot read image {name}: 32-bit float pixels have no standard range to scale to 8 bits; "
            "save the image as 8-bit (or 16-bit) PNG or JPEG"
        )
    raise UserError(
        f"cannot read image {name}: Pillow mode {mode!r} is not supported; save the image as 8-bit RGB PNG or JPEG"
    )


def read_rgb_image(path: str | Path) -> Image.Image:
    """The image file at ``path`` as an 8-bit ``RGB`` PIL image (H, W as stored; first frame; EXIF orientation
    not applied). Modes are handled as this module's docstring says.

    Raises:
        UserError: the file is missing, not an image Pillow can decode, truncated, larger than Pillow's
            decompression-bomb limit, or in a refused mode; the message names ``path``.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so that broken and truncated files fail here
    except FileNotFoundError as error:
        raise UserError(f"cannot read image {path}: the file does not exist") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow's decoders raise all of OSError, SyntaxError and ValueError for broken files
        raise UserError(f"cannot read image {path}: {error}") from error
    return to_rgb(image, str(path))
