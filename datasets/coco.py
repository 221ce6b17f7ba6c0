"""COCO-format detection data: ``coco_path/{train,val}2017/`` images and ``annotations/instances_*2017.json``.

The annotation file is read and checked completely when the dataset is built, so that a malformed file fails
before training with a :class:`util.errors.UserError` naming the file and the offending id (``main.py`` prints it
as one ``error:`` line). A ``file_name`` must lie inside the image folder: an absolute path or a ``..`` is refused.
Boxes that lie outside their image (or have no area once clipped to it) are dropped with a warning that counts them
and the images they leave without boxes. The category id is the label (as in the
original Deformable DETR, which trains COCO with ``num_classes=91``), so every category id must be below
``num_classes``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from datasets.transforms import Compose, Normalize, ToTensor, Transform
from util.errors import UserError
from util.image_io import read_rgb_image

logger = logging.getLogger(__name__)

IMAGE_SETS = ("train", "val")


@dataclass(frozen=True)
class ImageRecord:
    """One image and the boxes it trains on (crowd and degenerate boxes removed)."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (n, 4) float32 x0, y0, x1, y1 in pixels, clipped to the image
    labels: np.ndarray  # (n,) int64 category ids
    areas: np.ndarray  # (n,) float32 the annotations' "area"


@dataclass
class _ParsedAnnotations:
    records: list[ImageRecord]
    category_names: dict[int, str]
    num_crowd: int
    num_degenerate: int
    num_emptied: int  # images whose every box was degenerate


class DataNotFoundError(UserError, FileNotFoundError):
    """A folder or file of the data set (``coco_path``, an annotation file, an image) does not exist."""


class _EntryError(ValueError):
    """A problem with one JSON entry; re-raised as a UserError with the file and the entry's id in front."""


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON integers; not bool, not float


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _require(entry: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(entry, dict):
        raise _EntryError(f"expected a JSON object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise _EntryError(f"missing key {key!r}")


def _check_entries(path: Path, kind: str, entries: list, check: Callable[[Any], None]) -> None:
    """Run ``check`` on every entry; its error gets ``'FILE: KIND id 7: '`` (or ``'KIND at index 3'`` when
    the entry has no integer id) in front."""
    for index, entry in enumerate(entries):
        try:
            check(entry)
        except _EntryError as error:
            has_id = isinstance(entry, dict) and _is_int(entry.get("id"))
            where = f"{kind} id {entry['id']}" if has_id else f"{kind} at index {index}"
            raise UserError(f"{path}: {where}: {error}") from None


def load_annotation_file(path: str | Path) -> dict:
    """The JSON of a COCO annotation file, checked to hold lists ``images``, ``annotations`` and ``categories``;
    a :class:`UserError` names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"annotation file {path} does not exist: coco_path must hold annotations/instances_train2017.json, "
            "annotations/instances_val2017.json and the image folders train2017/, val2017/"
        )
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "save the file as UTF-8 JSON"
        ) from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: expected a list under {key!r}, got {type(data.get(key)).__name__}")
    return data


def _add_category(category: Any, num_classes: int, names: dict[int, str]) -> None:
    _require(category, ("id", "name"))
    category_id = category["id"]
    if not _is_int(category_id) or category_id < 0:
        raise _EntryError(f"'id' must be a non-negative integer, got {category_id!r}")
    if category_id >= num_classes:
        raise _EntryError(
            f"category ids are the labels and must be below num_classes={num_classes}; "
            f"set num_classes to at least {category_id + 1}"
        )
    if category_id in names:
        raise _EntryError("the category id appears twice")
    names[category_id] = str(category["name"])


def _add_image(image: Any, images: dict[int, dict]) -> None:
    _require(image, ("id", "file_name", "height", "width"))
    if not _is_int(image["id"]):
        raise _EntryError(f"'id' must be an integer, got {image['id']!r}")
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        raise _EntryError(f"'file_name' must be a non-empty string, got {image['file_name']!r}")
    if not _inside_folder(image["file_name"]):
        raise _EntryError(
            f"'file_name' {image['file_name']!r} points outside the image folder; it must be a path relative to "
            "the folder, without '..'"
        )
    for key in ("height", "width"):
        if not _is_int(image[key]) or image[key] <= 0:
            raise _EntryError(f"{key!r} must be a positive integer, got {image[key]!r}")
    if image["id"] in images:
        raise _EntryError("the image id appears twice")
    images[image["id"]] = image


def _inside_folder(file_name: str) -> bool:
    """Whether ``file_name`` stays inside the folder it is joined to: relative, no ``..`` part, no drive."""
    for path in (PurePosixPath(file_name), PureWindowsPath(file_name)):
        if path.is_absolute() or path.anchor or ".." in path.parts:
            return False
    return True


def _parse_box(bbox: Any) -> tuple[float, float, float, float]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(value) for value in bbox):
        raise _EntryError(f"'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(value) for value in bbox)
    if w < 0 or h < 0:
        raise _EntryError(f"'bbox' has a negative size (w={w}, h={h})")
    return x, y, w, h


def _clip_to_image(box: tuple[float, float, float, float], image: dict) -> tuple[float, float, float, float] | None:
    """``[x, y, w, h]`` -> ``x0, y0, x1, y1`` clipped to the image; None when nothing of it is left."""
    x, y, w, h = box
    x0, x1 = min(max(x, 0.0), image["width"]), min(max(x + w, 0.0), image["width"])
    y0, y1 = min(max(y, 0.0), image["height"]), min(max(y + h, 0.0), image["height"])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


class _BoxCollector:
    """Checks annotations one by one and keeps the trainable boxes per image, counting the others."""

    def __init__(self, images: dict[int, dict], category_names: dict[int, str]) -> None:
        self.images, self.category_names = images, category_names
        self.rows: dict[int, list[tuple]] = {image_id: [] for image_id in images}  # x0, y0, x1, y1, label, area
        self.annotation_ids: set[int] = set()
        self.num_crowd = self.num_degenerate = 0
        self.degenerate_images: set[int] = set()  # images with at least one degenerate box

    def __call__(self, annotation: Any) -> None:
        _require(annotation, ("id", "image_id", "category_id", "bbox"))
        if not _is_int(annotation["id"]):
            raise _EntryError(f"'id' must be an integer, got {annotation['id']!r}")
        if annotation["id"] in self.annotation_ids:
            raise _EntryError("the annotation id appears twice")
        self.annotation_ids.add(annotation["id"])
        image = self.images.get(annotation["image_id"]) if _is_int(annotation["image_id"]) else None
        if image is None:
            raise _EntryError(f"image_id {annotation['image_id']!r} is not among the file's images")
        category_id = annotation["category_id"]
        if not _is_int(category_id) or category_id not in self.category_names:
            raise _EntryError(f"category_id {category_id!r} is not among the file's categories")
        box = _parse_box(annotation["bbox"])
        iscrowd = annotation.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
            raise _EntryError(f"'iscrowd' must be 0 or 1, got {iscrowd!r}")
        area = annotation.get("area", box[2] * box[3])
        if not _is_number(area) or area < 0:
            raise _EntryError(f"'area' must be a non-negative number, got {area!r}")
        self._keep(image, box, category_id, float(area), bool(iscrowd))

    def _keep(
        self, image: dict, box: tuple[float, float, float, float], category_id: int, area: float, iscrowd: bool
    ) -> None:
        if iscrowd:
            self.num_crowd += 1
            return
        clipped = _clip_to_image(box, image)
        if clipped is None:
            self.num_degenerate += 1
            self.degenerate_images.add(image["id"])
            return
        self.rows[image["id"]].append((*clipped, category_id, area))


def _parse_annotations(path: Path, data: dict, num_classes: int) -> _ParsedAnnotations:
    """Check every entry of the annotation JSON ``data`` and group the trainable boxes by image."""
    category_names: dict[int, str] = {}
    _check_entries(
        path, "category", data["categories"], lambda entry: _add_category(entry, num_classes, category_names)
    )
    images: dict[int, dict] = {}
    _check_entries(path, "image", data["images"], lambda entry: _add_image(entry, images))
    boxes = _BoxCollector(images, category_names)
    _check_entries(path, "annotation", data["annotations"], boxes)
    records = [_make_record(images[image_id], boxes.rows[image_id]) for image_id in sorted(images)]
    emptied = sum(not boxes.rows[image_id] for image_id in boxes.degenerate_images)
    return _ParsedAnnotations(records, category_names, boxes.num_crowd, boxes.num_degenerate, emptied)


def _make_record(image: dict, rows: list[tuple]) -> ImageRecord:
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), 6)
    return ImageRecord(
        image_id=image["id"],
        file_name=image["file_name"],
        height=image["height"],
        width=image["width"],
        boxes=table[:, :4].astype(np.float32),
        labels=table[:, 4].astype(np.int64),
        areas=table[:, 5].astype(np.float32),
    )


class CocoDetection(torch.utils.data.Dataset):
    """Images of ``image_folder`` with the boxes of ``annotation_file``; the item ``index`` is the image with the
    ``index``-th smallest id. Images without annotations are kept (empty targets).

    An item is ``(image, target)``: ``image`` (3, H, W) float32 normalised with the ImageNet mean and std (H, W
    after the transforms), ``target`` a dict of
    ``boxes`` (n, 4) float32 ``cx, cy, w, h`` normalised to [0, 1] of the transformed image,
    ``labels`` (n,) int64 category ids, ``image_id`` () int64, ``orig_size`` (2,) int64 ``(h, w)`` of the file,
    ``size`` (2,) int64 ``(h, w)`` after the transforms, ``area`` (n,) float32 (scaled by the transforms),
    ``iscrowd`` (n,) int64 (all zero: crowd boxes are not trained on).

    Args:
        image_folder: directory holding each image's ``file_name``.
        annotation_file: COCO ``instances`` JSON.
        transforms: joint ``(PIL image, target) -> (tensor, target)`` transform ending in ``Normalize``, which
            receives boxes as ``x0, y0, x1, y1`` pixels (see ``datasets.transforms``); None: only
            ``ToTensor`` and ``Normalize``.
        num_classes: every category id must be below it.
        check_images: check at construction that every image file exists.

    Attributes:
        num_crowd_dropped, num_degenerate_dropped: boxes not trained on, because crowd, or because they have no
            area once clipped to the image (they lie outside it, or have no width or height): these are counted in
            a warning, with ``num_emptied_images``, the images they leave without boxes.
        category_names: ``{label: name}``; label_to_category_id: ``{label: category id}`` (the identity).
    """

    def __init__(
        self,
        image_folder: str | Path,
        annotation_file: str | Path,
        transforms: Transform | None,
        num_classes: int,
        check_images: bool = True,
    ) -> None:
        if not _is_int(num_classes) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.image_folder = Path(image_folder)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms if transforms is not None else Compose([ToTensor(), Normalize()])
        self.num_classes = num_classes
        parsed = _parse_annotations(self.annotation_file, load_annotation_file(self.annotation_file), num_classes)
        self.records = parsed.records
        self.category_names = parsed.category_names
        self.label_to_category_id = {label: label for label in self.category_names}
        self.num_crowd_dropped = parsed.num_crowd
        self.num_degenerate_dropped = parsed.num_degenerate
        self.num_emptied_images = parsed.num_emptied
        self._coco: COCO | None = None
        if check_images:
            self._check_images_exist()
        num_boxes = sum(len(record.labels) for record in self.records)
        logger.info(
            "%s: %d images, %d categories, %d boxes; dropped %d crowd and %d degenerate boxes",
            self.annotation_file,
            len(self.records),
            len(self.category_names),
            num_boxes,
            self.num_crowd_dropped,
            self.num_degenerate_dropped,
        )
        if self.num_degenerate_dropped:
            logger.warning(
                "%s: %d of its %d non-crowd boxes lie outside their image or have no area inside it and are not "
                "used%s; check the boxes' [x, y, width, height] against the images' sizes",
                self.annotation_file,
                self.num_degenerate_dropped,
                self.num_degenerate_dropped + num_boxes,
                f", leaving {self.num_emptied_images} image(s) without boxes" if self.num_emptied_images else "",
            )

    def _check_images_exist(self) -> None:
        if not self.image_folder.is_dir():
            raise DataNotFoundError(
                f"image folder {self.image_folder} does not exist (annotations: {self.annotation_file})"
            )
        for record in self.records:
            path = self.image_folder / record.file_name
            if not path.is_file():
                raise DataNotFoundError(
                    f"image {path} (image id {record.image_id} in {self.annotation_file}) does not exist"
                )

    @property
    def image_ids(self) -> list[int]:
        """Image ids in item order."""
        return [record.image_id for record in self.records]

    @property
    def coco(self) -> COCO:
        """The pycocotools ``COCO`` object of the annotation file (ground truth for ``COCOeval``), loaded once."""
        if self._coco is None:
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO(str(self.annotation_file))
        return self._coco

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_coco"] = None  # DataLoader workers do not need the ground truth index
        return state

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of item ``index`` (read by :func:`util.image_io.read_rgb_image`); errors name the file and
        the image id."""
        record = self.records[index]
        path = self.image_folder / record.file_name
        try:
            image = read_rgb_image(path)
        except UserError as error:
            raise UserError(f"{error} (image id {record.image_id} in {self.annotation_file})") from error
        if (image.height, image.width) != (record.height, record.width):
            raise UserError(
                f"image {path} (image id {record.image_id}) is {image.height}x{image.width} pixels "
                f"but {self.annotation_file} says {record.height}x{record.width} (height x width)"
            )
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        image = self.load_image(index)
        size = torch.tensor([record.height, record.width], dtype=torch.int64)
        target = {
            "boxes": torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(record.labels, dtype=torch.int64),
            "area": torch.tensor(record.areas, dtype=torch.float32),
            "iscrowd": torch.zeros(len(record.labels), dtype=torch.int64),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "orig_size": size,
            "size": size.clone(),
        }
        image, target = self.transforms(image, target)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"transforms must end with ToTensor and Normalize, they returned {type(image).__name__}")
        return image, target


def build_dataset(
    image_set: str,
    coco_path: str | Path,
    transforms: Transform | None = None,
    num_classes: int = 91,
    check_images: bool = True,
) -> CocoDetection:
    """The ``"train"`` or ``"val"`` split of the COCO-layout folder ``coco_path``: images in
    ``coco_path/{image_set}2017/``, annotations in ``coco_path/annotations/instances_{image_set}2017.json``."""
    if image_set not in IMAGE_SETS:
        raise ValueError(f"image_set must be one of {IMAGE_SETS}, got {image_set!r}")
    if not str(coco_path):
        raise UserError("coco_path is empty: set it to the data set's folder (e.g. --opts coco_path=data/coco)")
    root = Path(coco_path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataNotFoundError(
            f"coco_path {root} {what}: give the folder holding train2017/, val2017/ and annotations/ "
            "(e.g. --opts coco_path=data/coco)"
        )
    return CocoDetection(
        root / f"{image_set}2017",
        root / "annotations" / f"instances_{image_set}2017.json",
        transforms,
        num_classes,
        check_images,
    )
