"""The COCO-format dataset: targets, what it drops and counts, and an error naming file and id for bad input."""

from __future__ import annotations

import logging
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.coco import build_dataset
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.coco_data import annotation_dict, write_coco
from util.errors import UserError


@pytest.fixture
def coco_root(tmp_path):
    write_coco(tmp_path)
    return tmp_path


def _item(dataset, image_id: int):
    return dataset[dataset.image_ids.index(image_id)]


def test_item_has_the_documented_fields(coco_root):
    image, target = _item(build_dataset("train", coco_root, num_classes=4), 7)
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32
    assert target["boxes"].shape == (2, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [1, 3] and target["labels"].dtype == torch.int64
    assert target["image_id"].item() == 7
    assert target["orig_size"].tolist() == [20, 30] and target["size"].tolist() == [20, 30]
    assert target["area"].tolist() == [50.0, 40.0]
    assert target["iscrowd"].tolist() == [0, 0]


def test_boxes_are_normalised_cxcywh_of_the_clipped_box(coco_root):
    _, target = _item(build_dataset("train", coco_root, num_classes=4), 7)
    # [2, 3, 10, 5] and [25, 10, 10, 4] clipped at the width 30 to x 25..30, in a 30 x 20 (w x h) image.
    expected = torch.tensor([[7 / 30, 5.5 / 20, 10 / 30, 5 / 20], [27.5 / 30, 12 / 20, 5 / 30, 4 / 20]])
    torch.testing.assert_close(target["boxes"], expected)


def test_image_is_normalised_with_imagenet_mean_and_std(coco_root):
    dataset = build_dataset("train", coco_root, num_classes=4)
    image, _ = _item(dataset, 7)
    pixels = torch.from_numpy(np.array(Image.open(coco_root / "train2017" / "a.png"))).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(image * std + mean, pixels)


def test_images_without_annotations_are_kept(coco_root):
    dataset = build_dataset("train", coco_root, num_classes=4)
    assert dataset.image_ids == [7, 8, 9]
    image, target = _item(dataset, 9)
    assert image.shape == (3, 12, 12)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_crowd_boxes_are_dropped_and_counted(coco_root):
    dataset = build_dataset("train", coco_root, num_classes=4)
    _, target = _item(dataset, 8)
    assert dataset.num_crowd_dropped == 1
    assert target["labels"].tolist() == [3]  # only annotation 106 of image 8 is trained on
    assert target["iscrowd"].tolist() == [0]


def test_degenerate_boxes_are_dropped_counted_and_logged(coco_root, caplog):
    with caplog.at_level(logging.INFO, logger="datasets.coco"):
        dataset = build_dataset("train", coco_root, num_classes=4)
    assert dataset.num_degenerate_dropped == 2  # zero width (104) and outside the image (105)
    assert "dropped 1 crowd and 2 degenerate boxes" in caplog.text


def test_category_id_too_large_names_file_and_id(tmp_path):
    data = annotation_dict()
    data["categories"].append({"id": 90, "name": "fox"})
    annotation_file = write_coco(tmp_path, data)
    with pytest.raises(ValueError, match=re.escape(f"{annotation_file}: category id 90")) as error:
        build_dataset("train", tmp_path, num_classes=4)
    assert "num_classes=4" in str(error.value)


def _set(entry: dict, key: str, value) -> None:
    entry[key] = value


# name -> (change to the annotation dict, fragment naming the id, fragment saying what is wrong)
MALFORMED = {
    "annotation_without_bbox": (lambda d: d["annotations"][1].pop("bbox"), "annotation id 102", "'bbox'"),
    "annotation_without_image_id": (lambda d: d["annotations"][0].pop("image_id"), "annotation id 101", "'image_id'"),
    "annotation_without_category_id": (
        lambda d: d["annotations"][5].pop("category_id"),
        "annotation id 106",
        "'category_id'",
    ),
    "annotation_without_id": (lambda d: d["annotations"][2].pop("id"), "annotation at index 2", "'id'"),
    "negative_box_width": (
        lambda d: _set(d["annotations"][0], "bbox", [2, 3, -1, 5]),
        "annotation id 101",
        "negative size",
    ),
    "negative_box_height": (
        lambda d: _set(d["annotations"][1], "bbox", [2, 3, 4, -5]),
        "annotation id 102",
        "negative size",
    ),
    "unknown_image_id": (
        lambda d: _set(d["annotations"][3], "image_id", 99),
        "annotation id 104",
        "image_id 99 is not among",
    ),
    "unknown_category_id": (
        lambda d: _set(d["annotations"][0], "category_id", 2),
        "annotation id 101",
        "category_id 2 is not among",
    ),
    "bbox_of_three_numbers": (
        lambda d: _set(d["annotations"][0], "bbox", [1, 2, 3]),
        "annotation id 101",
        "4 finite numbers",
    ),
    "bbox_not_numbers": (
        lambda d: _set(d["annotations"][0], "bbox", [1, "2", 3, 4]),
        "annotation id 101",
        "4 finite numbers",
    ),
    "bbox_with_nan": (
        lambda d: _set(d["annotations"][0], "bbox", [1, 2, float("nan"), 4]),
        "annotation id 101",
        "4 finite numbers",
    ),
    "annotation_not_an_object": (
        lambda d: d["annotations"].insert(3, [1, 2]),
        "annotation at index 3",
        "expected a JSON object",
    ),
    "image_id_not_an_integer": (lambda d: _set(d["images"][2], "id", "9"), "image at index 2", "'id'"),
    "bbox_not_a_list": (
        lambda d: _set(d["annotations"][4], "bbox", "1 2 3 4"),
        "annotation id 105",
        "4 finite numbers",
    ),
    "duplicate_annotation_id": (lambda d: _set(d["annotations"][1], "id", 101), "annotation id 101", "appears twice"),
    "bad_iscrowd": (lambda d: _set(d["annotations"][0], "iscrowd", 2), "annotation id 101", "'iscrowd'"),
    "negative_area": (lambda d: _set(d["annotations"][0], "area", -3.0), "annotation id 101", "'area'"),
    "image_without_file_name": (lambda d: d["images"][1].pop("file_name"), "image id 8", "'file_name'"),
    "negative_image_height": (lambda d: _set(d["images"][0], "height", -20), "image id 7", "'height'"),
    "duplicate_image_id": (lambda d: _set(d["images"][1], "id", 7), "image id 7", "appears twice"),
    "category_without_name": (lambda d: d["categories"][1].pop("name"), "category id 3", "'name'"),
    "no_annotations_list": (lambda d: d.pop("annotations"), "expected a list under 'annotations'", ""),
    "file_name_climbing_out": (
        lambda d: _set(d["images"][1], "file_name", "../../../../etc/hostname"),
        "image id 8",
        "'file_name' '../../../../etc/hostname' points outside the image folder",
    ),
    "file_name_absolute": (
        lambda d: _set(d["images"][0], "file_name", "/etc/hostname"),
        "image id 7",
        "points outside the image folder",
    ),
    "file_name_climbing_out_of_a_subfolder": (
        lambda d: _set(d["images"][0], "file_name", "sub/../../a.png"),
        "image id 7",
        "points outside the image folder",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_annotation_names_file_and_id(tmp_path, case):
    change, names_id, says_what = MALFORMED[case]
    data = annotation_dict()
    change(data)
    annotation_file = write_coco(tmp_path, data)
    with pytest.raises(UserError, match=re.escape(f"{annotation_file}: {names_id}")) as error:
        build_dataset("train", tmp_path, num_classes=4)
    assert says_what in str(error.value)


def test_a_file_name_in_a_subfolder_is_read(tmp_path):
    data = annotation_dict()
    data["images"][2]["file_name"] = "sub/c.png"
    write_coco(tmp_path, data)
    dataset = build_dataset("train", tmp_path, num_classes=4)
    image, _ = _item(dataset, 9)
    assert image.shape == (3, 12, 12)


def test_boxes_outside_their_images_are_counted_in_a_warning(tmp_path, caplog):
    data = annotation_dict()
    for annotation in data["annotations"]:
        if annotation["image_id"] == 7:
            annotation["bbox"] = [31, 2, 5, 5]  # right of the 30-pixel-wide image
    write_coco(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        dataset = build_dataset("train", tmp_path, num_classes=4)
    assert dataset.num_degenerate_dropped == 4 and dataset.num_emptied_images == 1
    (warning,) = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.getMessage().startswith(
        f"{tmp_path / 'annotations' / 'instances_train2017.json'}: 4 of its 5 non-crowd boxes lie outside their "
        "image or have no area inside it and are not used, leaving 1 image(s) without boxes"
    )


def test_no_warning_when_every_box_is_inside(tmp_path, caplog):
    data = annotation_dict()
    data["annotations"] = [annotation for annotation in data["annotations"] if annotation["id"] in (101, 106)]
    write_coco(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        build_dataset("train", tmp_path, num_classes=4)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_invalid_json_names_the_file(tmp_path):
    annotation_file = write_coco(tmp_path)
    annotation_file.write_text("{not json")
    with pytest.raises(UserError, match=re.escape(f"{annotation_file}: not valid JSON")):
        build_dataset("train", tmp_path, num_classes=4)


def test_a_file_not_in_utf8_is_named_with_the_byte(tmp_path):
    annotation_file = write_coco(tmp_path)
    annotation_file.write_bytes(b'{"images": [], "note": "caf\xe9"}')
    with pytest.raises(UserError, match=re.escape(f"{annotation_file}: not UTF-8 text (byte 0xe9 at offset 27)")):
        build_dataset("train", tmp_path, num_classes=4)


@pytest.mark.parametrize("coco_path", ["", "nothing", "a_file"])
def test_a_coco_path_that_is_not_a_folder_is_named(tmp_path, coco_path):
    (tmp_path / "a_file").write_text("")
    path = str(tmp_path / coco_path) if coco_path else ""
    with pytest.raises(UserError, match="coco_path"):
        build_dataset("train", path, num_classes=4)


def test_missing_annotation_file_names_the_file(tmp_path):
    write_coco(tmp_path, image_set="train")
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        build_dataset("val", tmp_path, num_classes=4)


def test_missing_image_names_file_and_id_at_construction(coco_root):
    (coco_root / "train2017" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.png \(image id 8"):
        build_dataset("train", coco_root, num_classes=4)


def test_unreadable_image_names_file_and_id(coco_root):
    (coco_root / "train2017" / "b.png").write_bytes(b"this is not a PNG")
    dataset = build_dataset("train", coco_root, num_classes=4)
    with pytest.raises(
        UserError, match=r"cannot read image .*b\.png: .* \(image id 8 in .*instances_train2017\.json\)"
    ):
        _item(dataset, 8)


def test_sixteen_bit_grey_image_is_read_as_its_gradient_not_white(coco_root):
    gradient = np.linspace(0, 65535, 24 * 16).round().astype(np.uint16).reshape(24, 16)
    Image.fromarray(gradient).save(coco_root / "train2017" / "b.png")
    image, _ = _item(build_dataset("train", coco_root, num_classes=4), 8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    grey = torch.from_numpy(np.rint(gradient / 65535 * 255)).float() / 255  # (24, 16), independent of util.image_io
    torch.testing.assert_close(image * std + mean, grey.expand(3, -1, -1))


def test_image_size_differing_from_the_annotation_names_file_and_id(coco_root):
    Image.new("RGB", (5, 5)).save(coco_root / "train2017" / "a.png")
    dataset = build_dataset("train", coco_root, num_classes=4)
    with pytest.raises(ValueError, match=r"a\.png \(image id 7\) is 5x5 pixels .* says 20x30"):
        _item(dataset, 7)


def test_unknown_image_set_is_rejected(coco_root):
    with pytest.raises(ValueError, match="image_set must be one of"):
        build_dataset("test", coco_root, num_classes=4)


def test_evaluation_helpers_match_the_annotation_file(coco_root):
    dataset = build_dataset("train", coco_root, num_classes=4)
    assert sorted(dataset.coco.getImgIds()) == dataset.image_ids
    assert dataset.label_to_category_id == {1: 1, 3: 3}
    assert dataset.category_names == {1: "cat", 3: "dog"}
    assert dataset.annotation_file == coco_root / "annotations" / "instances_train2017.json"


def test_dataset_pickles_without_its_coco_index(coco_root):
    dataset = build_dataset("train", coco_root, num_classes=4)
    dataset.coco  # noqa: B018 - loads the index
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._coco is None and len(copy) == len(dataset)
    torch.testing.assert_close(copy[0][1]["boxes"], dataset[0][1]["boxes"])
