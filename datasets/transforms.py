"""Joint image + target transforms of Deformable DETR (Zhu et al., implementation details: DETR's augmentation).

Every transform is a callable ``(image, target) -> (image, target)``. Until :class:`ToTensor` the image is a
``PIL.Image`` and ``target["boxes"]`` is ``(n, 4)`` float32 ``x0, y0, x1, y1`` in pixels of the current image;
:class:`Normalize` turns the image into ImageNet-normalised values and the boxes into ``cx, cy, w, h``
normalised to [0, 1] of the image, the format the model and its loss read. ``target["size"]`` is ``(2,)``
int64 ``(h, w)`` of the current image throughout. Random choices draw from torch's global generator, which
``DataLoader`` seeds differently in every worker.

The pixel and box arithmetic is ``torchvision.transforms.v2.functional`` (Pillow underneath for PIL images,
``tv_tensors.BoundingBoxes`` for the boxes); the random choices stay here, because v2's classes differ from the
paper's code: ``RandomShortestSize`` truncates the longer side where :func:`resized_size` rounds, no v2 class scales
``target["area"]``, and ``SanitizeBoundingBoxes`` drops boxes under one pixel that the paper keeps. DETR's
:class:`RandomSizeCrop` stays custom. ``python -m benchmarks.transforms`` times the pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_area
from torchvision.transforms.v2 import functional as F

from util.image_io import to_rgb

Target = dict[str, torch.Tensor]
Transform = Callable[[object, Target], tuple[object, Target]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The paper's training scales (shorter side 480..800 step 32, longer side at most 1333) and crop branch.
TRAIN_SCALES = tuple(range(480, 801, 32))
MAX_SIZE = 1333
CROP_SCALES = (400, 500, 600)
CROP_SIZE = (384, 600)
VAL_SIZE = 800
# Fields holding one entry per box: filtering boxes filters these alike.
PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")


def _random_int(low: int, high: int) -> int:
    """A uniform integer in [low, high] (both inclusive) from torch's global generator."""
    return int(torch.randint(low, high + 1, ()).item())


def _keep_boxes(target: Target, keep: torch.Tensor) -> Target:
    return {key: value[keep] if key in PER_BOX_KEYS else value for key, value in target.items()}


def resized_size(height: int, width: int, shorter: int, max_size: int | None = None) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``shorter`` and the aspect ratio kept, shrunk further so that the longer
    side is at most ``max_size``."""
    scale = shorter / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def xyxy_to_normalised_cxcywh(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 4) ``x0, y0, x1, y1`` in pixels -> (n, 4) ``cx, cy, w, h`` as fractions of the image's width/height."""
    cxcywh = F.convert_bounding_box_format(boxes, old_format="XYXY", new_format="CXCYWH")
    return cxcywh / torch.tensor([width, height, width, height], dtype=boxes.dtype)


def _bounding_boxes(target: Target, height: int, width: int) -> tv_tensors.BoundingBoxes:
    """``target["boxes"]`` as torchvision boxes on an image of (height, width): clamped to it when cropped."""
    return tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))


def _with_boxes(target: Target, boxes: tv_tensors.BoundingBoxes) -> Target:
    return dict(target, boxes=boxes.as_subclass(torch.Tensor), size=torch.tensor(boxes.canvas_size))


def resize(image: Image.Image, target: Target, height: int, width: int) -> tuple[Image.Image, Target]:
    """Resize to exactly ``(height, width)`` (Pillow's bilinear, which antialiases); boxes and areas scale with it."""
    boxes = F.resize(_bounding_boxes(target, image.height, image.width), [height, width])
    target = _with_boxes(target, boxes)
    if "area" in target:
        target["area"] = target["area"] * (width / image.width * height / image.height)
    return F.resize(image, [height, width], interpolation=F.InterpolationMode.BILINEAR), target


def crop_region(
    image: Image.Image, target: Target, top: int, left: int, height: int, width: int
) -> tuple[Image.Image, Target]:
    """Cut the region ``[top, top + height) x [left, left + width)``; boxes are clipped to it, boxes left with no
    area are removed (with their labels), areas become those of the clipped boxes.

    Boxes of any positive width and height are kept, as in the paper's code; ``v2.SanitizeBoundingBoxes`` would
    also drop those under one pixel (its ``min_size`` cannot go below 1), so it is not used here."""
    target = _with_boxes(target, F.crop(_bounding_boxes(target, image.height, image.width), top, left, height, width))
    if "area" in target:
        target["area"] = box_area(target["boxes"])
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return F.crop(image, top, left, height, width), _keep_boxes(target, keep)


def hflip(image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
    """Mirror left-right: ``x`` becomes ``width - x``, so ``x0, x1`` become ``width - x1, width - x0``."""
    boxes = F.horizontal_flip(_bounding_boxes(target, image.height, image.width))
    return F.horizontal_flip(image), _with_boxes(target, boxes)


class Compose:
    """Apply ``transforms`` one after another."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, target: Target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {transform!r}" for transform in self.transforms)
        return f"Compose({inner}\n)"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize so that the shorter side is one of ``scales`` (picked uniformly) and the longer side is at most
    ``max_size``; with one scale this is the deterministic validation resize."""

    def __init__(self, scales: Sequence[int], max_size: int | None = None) -> None:
        self.scales = [int(scale) for scale in scales]
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive sizes, got {list(scales)}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive or None, got {max_size}")
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        shorter = self.scales[_random_int(0, len(self.scales) - 1)]
        height, width = resized_size(image.height, image.width, shorter, self.max_size)
        return resize(image, target, height, width)

    def __repr__(self) -> str:
        return f"RandomResize(scales={self.scales}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region whose height and width are uniform in ``[min_size, max_size]`` (capped by the image),
    at a uniform position."""

    def __init__(self, min_size: int, max_size: int) -> None:
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        sizes = []
        for extent in (image.height, image.width):
            largest = min(extent, self.max_size)
            sizes.append(_random_int(min(self.min_size, largest), largest))
        height, width = sizes
        top = _random_int(0, image.height - height)
        left = _random_int(0, image.width - width)
        return crop_region(image, target, top, left, height, width)

    def __repr__(self) -> str:
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target: Target):
        if torch.rand(()).item() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect(p={self.p},\n  first={self.first!r},\n  second={self.second!r})"


class ToTensor:
    """``PIL.Image`` -> float32 tensor (3, H, W) in [0, 1] (images not in RGB go through
    :func:`util.image_io.to_rgb` first); the target is unchanged."""

    def __call__(self, image: Image.Image, target: Target) -> tuple[torch.Tensor, Target]:
        if not isinstance(image, Image.Image):
            raise TypeError(f"ToTensor expects a PIL.Image, got {type(image).__name__}")
        pixels = F.pil_to_tensor(to_rgb(image))  # (3, H, W) uint8
        return F.to_dtype(pixels, torch.float32, scale=True), target

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Image tensor (3, H, W) -> ``(image - mean) / std``; boxes ``x0, y0, x1, y1`` pixels -> ``cx, cy, w, h``
    normalised to [0, 1] of the (H, W) image. Always the last transform."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 entries each, std positive; got mean={mean}, std={std}")
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"Normalize expects a tensor image (put ToTensor before it), got {type(image).__name__}")
        height, width = image.shape[-2:]
        target = dict(target, boxes=xyxy_to_normalised_cxcywh(target["boxes"], height, width))
        return F.normalize(image, list(self.mean), list(self.std)), target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def build_transforms(
    image_set: str,
    scales: Sequence[int] = TRAIN_SCALES,
    max_size: int | None = MAX_SIZE,
    crop: bool = True,
    crop_scales: Sequence[int] = CROP_SCALES,
    crop_size: tuple[int, int] = CROP_SIZE,
    val_size: int = VAL_SIZE,
    flip_p: float = 0.5,
) -> Compose:
    """The paper's pipelines; the defaults are its sizes, smaller ones serve small images.

    ``"train"``: horizontal flip, then either a resize to a random scale of ``scales`` or (with ``crop``, half
    the time) a resize to one of ``crop_scales``, a random crop of ``crop_size = (min, max)`` and a resize to one
    of ``scales``; the longer side is at most ``max_size``. ``"val"``: resize to ``val_size`` (longer side at most
    ``max_size``). Both end with :class:`ToTensor` and :class:`Normalize`. For 128-pixel images, for example:
    ``build_transforms("train", scales=range(96, 161, 16), max_size=256, crop_scales=(80, 100, 120),
    crop_size=(64, 120))`` and ``build_transforms("val", val_size=128, max_size=256)``.
    """
    finish = [ToTensor(), Normalize()]
    if image_set == "val":
        return Compose([RandomResize([val_size], max_size), *finish])
    if image_set != "train":
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    multi_scale = RandomResize(scales, max_size)
    if crop:
        cropped = Compose([RandomResize(crop_scales), RandomSizeCrop(*crop_size), RandomResize(scales, max_size)])
        multi_scale = RandomSelect(multi_scale, cropped)
    return Compose([RandomHorizontalFlip(flip_p), multi_scale, *finish])
