"""The shapes generator: COCO layout, tight boxes, and the same files for the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasets import shapes
from datasets.coco import build_dataset


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate_shapes_dataset(out, num_train=12, num_val=4, seed=3, size=48)
    return out


def _files(root) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_writes_the_coco_layout(generated):
    for split, count in (("train", 12), ("val", 4)):
        data = json.loads((generated / "annotations" / f"instances_{split}2017.json").read_text())
        assert len(data["images"]) == count
        assert [category["name"] for category in data["categories"]] == list(shapes.CATEGORY_NAMES)
        for image in data["images"]:
            assert (generated / f"{split}2017" / image["file_name"]).is_file()
            assert 36 <= image["height"] <= 48 and 36 <= image["width"] <= 48


def test_annotations_are_valid_and_inside_their_images(generated):
    data = json.loads((generated / "annotations" / "instances_train2017.json").read_text())
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    assert len({annotation["id"] for annotation in data["annotations"]}) == len(data["annotations"])
    assert len({annotation["category_id"] for annotation in data["annotations"]}) >= 3
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        height, width = sizes[annotation["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
        assert annotation["iscrowd"] == 0 and 0 < annotation["area"] <= w * h + 1


def test_the_dataset_reads_it_with_num_classes_six(generated):
    dataset = build_dataset("val", generated, num_classes=len(shapes.CATEGORY_NAMES) + 1)
    assert len(dataset) == 4 and dataset.num_degenerate_dropped == 0 and dataset.num_crowd_dropped == 0
    image, target = dataset[0]
    assert image.shape[0] == 3 and target["labels"].min() >= 1


def test_the_same_seed_gives_identical_files(generated, tmp_path):
    shapes.generate_shapes_dataset(tmp_path, num_train=12, num_val=4, seed=3, size=48)
    assert _files(tmp_path) == _files(generated)


def test_two_worker_processes_write_the_same_files(generated, tmp_path):
    shapes.generate_shapes_dataset(tmp_path, num_train=12, num_val=4, seed=3, size=48, workers=2)
    assert _files(tmp_path) == _files(generated)


def test_another_seed_gives_other_data(generated, tmp_path):
    shapes.generate_shapes_dataset(tmp_path, num_train=12, num_val=4, seed=4, size=48)
    name = "annotations/instances_train2017.json"
    assert _files(tmp_path)[name] != _files(generated)[name]


@pytest.mark.parametrize("name", shapes.CATEGORY_NAMES)
def test_boxes_fit_the_drawn_shape_tightly(name):
    rng = np.random.default_rng(0)
    for _ in range(5):
        alpha, (x, y, w, h) = shapes._shape_alpha(name, rng, 64, 80)
        # Any coverage: a star's tip is thinner than a pixel for its last pixel or two.
        rows, columns = np.nonzero(alpha.max(1) > 0)[0], np.nonzero(alpha.max(0) > 0)[0]
        extent = np.array([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1])
        np.testing.assert_allclose(extent, [x, y, x + w, y + h], atol=1.0)


def test_command_line(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--seed", "0", "--size", "32"])
    assert "wrote 2 train and 1 val images" in capsys.readouterr().out
    assert len(list((tmp_path / "train2017").glob("*.png"))) == 2
    assert (tmp_path / "annotations" / "instances_val2017.json").is_file()


def test_the_first_images_do_not_depend_on_how_many_follow(generated, tmp_path):
    shapes.generate_shapes_dataset(tmp_path, num_train=3, num_val=0, seed=3, size=48)
    for name in ("000000000001.png", "000000000003.png"):
        assert (tmp_path / "train2017" / name).read_bytes() == (generated / "train2017" / name).read_bytes()


def test_max_objects_bounds_the_objects_per_image():
    rng = np.random.default_rng(0)
    counts = {len(shapes.render_image(rng, 64, 64, max_objects=2)[1]) for _ in range(30)}
    assert counts <= {0, 1, 2} and 2 in counts


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="size must be at least 32"):
        shapes.generate_shapes_dataset(tmp_path, 1, 1, size=8)
    with pytest.raises(ValueError, match="num_train and num_val must be >= 0"):
        shapes.generate_shapes_dataset(tmp_path, -1, 1)
    with pytest.raises(ValueError, match="max_objects must be at least 1"):
        shapes.generate_shapes_dataset(tmp_path, 1, 1, max_objects=0)
    with pytest.raises(ValueError, match="workers"):
        shapes.generate_shapes_dataset(tmp_path, 1, 1, workers=0)
