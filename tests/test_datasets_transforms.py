"""Transforms keep boxes on the pixels they annotate; sizes follow the paper's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import transforms as T

MEAN = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
SMALL_TRAIN = {"scales": [40, 48, 56, 64], "max_size": 100, "crop_scales": (40, 50, 60), "crop_size": (24, 48)}


def _painted(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> tuple[Image.Image, dict]:
    """A black image where box i (x0, y0, x1, y1) is painted into colour channel i; its label is i."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for channel, (x0, y0, x1, y1) in enumerate(boxes):
        pixels[y0:y1, x0:x1, channel] = 255
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target = {
        "boxes": box_tensor,
        "labels": torch.arange(len(boxes)),
        "area": (box_tensor[:, 2] - box_tensor[:, 0]) * (box_tensor[:, 3] - box_tensor[:, 1]),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
        "image_id": torch.tensor(1),
        "size": torch.tensor([height, width]),
    }
    return Image.fromarray(pixels), target


def _pixels(image) -> torch.Tensor:
    """(3, H, W) in [0, 1] from a PIL image or a normalised tensor."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    return image * STD + MEAN


def _xyxy_pixels(image, target) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return target["boxes"]
    height, width = image.shape[-2:]
    cx, cy, w, h = (target["boxes"] * torch.tensor([width, height, width, height])).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _assert_boxes_cover_their_paint(image, target, num_painted: int, tolerance: float = 1.0) -> None:
    pixels, boxes = _pixels(image), _xyxy_pixels(image, target)
    assert target["size"].tolist() == list(pixels.shape[-2:])
    labels = target["labels"].tolist()
    for channel in range(num_painted):
        painted = pixels[channel] > 0.5
        if channel not in labels:
            assert not painted.any(), f"box {channel} was removed but its pixels are still in the image"
            continue
        box = boxes[labels.index(channel)]
        if min(box[2] - box[0], box[3] - box[1]) < 3:
            continue  # a sliver: interpolation decides whether its pixels pass the threshold
        rows, columns = painted.any(1).nonzero()[:, 0], painted.any(0).nonzero()[:, 0]
        extent = torch.tensor([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(box, extent, atol=tolerance, rtol=0)


def test_hflip_mirrors_boxes():
    image, target = _painted(10, 20, [(2, 1, 7, 4)])
    image, target = T.hflip(image, target)
    assert target["boxes"].tolist() == [[13, 1, 18, 4]]
    _assert_boxes_cover_their_paint(image, target, 1, tolerance=0)


@pytest.mark.parametrize("size", [(13, 50), (71, 33), (48, 64)])
def test_resize_keeps_boxes_on_their_pixels(size):
    image, target = _painted(48, 64, [(5, 7, 30, 20), (20, 10, 60, 45)])
    image, target = T.resize(image, target, *size)
    assert image.size == (size[1], size[0])
    _assert_boxes_cover_their_paint(image, target, 2)


def test_resize_scales_area_with_the_image():
    image, target = _painted(40, 40, [(0, 0, 10, 10)])
    _, target = T.resize(image, target, 20, 80)
    assert target["area"].tolist() == [100.0]


def test_crop_clips_boxes_and_drops_those_outside():
    image, target = _painted(40, 60, [(2, 2, 9, 12), (20, 5, 50, 30), (40, 30, 55, 38)])
    image, target = T.crop_region(image, target, top=4, left=10, height=30, width=35)
    assert target["labels"].tolist() == [1, 2]  # box 0 lies left of the crop; labels follow their boxes
    assert target["boxes"].tolist() == [[10, 1, 35, 26], [30, 26, 35, 30]]
    assert target["area"].tolist() == [25 * 25, 5 * 4]
    assert target["iscrowd"].tolist() == [0, 0]
    _assert_boxes_cover_their_paint(image, target, 3, tolerance=0)


@pytest.mark.parametrize("seed", range(12))
def test_random_size_crop_keeps_boxes_on_their_pixels(seed):
    torch.manual_seed(seed)
    image, target = _painted(48, 64, [(5, 7, 30, 20), (20, 10, 60, 45), (40, 2, 62, 12)])
    image, target = T.RandomSizeCrop(16, 40)(image, target)
    assert 16 <= image.height <= 40 and 16 <= image.width <= 40
    _assert_boxes_cover_their_paint(image, target, 3, tolerance=0)


def test_random_size_crop_of_an_image_smaller_than_min_size_keeps_it_whole():
    image, target = _painted(10, 12, [(1, 1, 5, 5)])
    image, target = T.RandomSizeCrop(24, 48)(image, target)
    assert image.size == (12, 10) and target["boxes"].tolist() == [[1, 1, 5, 5]]


@pytest.mark.parametrize("seed", range(16))
def test_train_pipeline_keeps_boxes_on_their_pixels(seed):
    torch.manual_seed(seed)
    image, target = _painted(48, 64, [(5, 7, 30, 20), (20, 10, 60, 45), (40, 2, 62, 12)])
    image, target = T.build_transforms("train", **SMALL_TRAIN)(image, target)
    assert image.shape[0] == 3 and max(image.shape[1:]) <= SMALL_TRAIN["max_size"]
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    _assert_boxes_cover_their_paint(image, target, 3)


def test_resized_size_sets_the_shorter_side_and_caps_the_longer():
    assert T.resized_size(480, 640, 800, 1333) == (800, 1067)
    assert T.resized_size(640, 480, 800, 1333) == (1067, 800)
    assert T.resized_size(100, 1000, 800, 1333) == (133, 1333)
    assert T.resized_size(100, 1000, 800, None) == (800, 8000)


def test_random_resize_draws_every_scale():
    image, target = _painted(30, 40, [(1, 1, 5, 5)])
    resize = T.RandomResize([10, 20, 30], max_size=50)
    torch.manual_seed(0)
    shorter_sides = {min(resize(image, target)[0].size) for _ in range(60)}
    assert shorter_sides == {10, 20, 30}


def test_random_horizontal_flip_flips_about_half_the_time():
    image, target = _painted(8, 8, [(0, 0, 2, 2)])
    flip = T.RandomHorizontalFlip(0.5)
    torch.manual_seed(0)
    flipped = sum(flip(image, target)[1]["boxes"][0, 0].item() == 6 for _ in range(200))
    assert 70 < flipped < 130


def test_random_select_takes_both_branches():
    def mark(name):
        return lambda image, target: (image, dict(target, branch=name))

    select = T.RandomSelect(mark("first"), mark("second"), p=0.5)
    torch.manual_seed(0)
    assert {select(None, {})[1]["branch"] for _ in range(50)} == {"first", "second"}


def test_normalize_gives_imagenet_statistics_and_normalised_cxcywh():
    image, target = _painted(10, 20, [(2, 4, 12, 10)])
    tensor, target = T.Normalize()(*T.ToTensor()(image, target))
    torch.testing.assert_close(target["boxes"], torch.tensor([[7 / 20, 7 / 10, 10 / 20, 6 / 10]]))
    torch.testing.assert_close(tensor[:, 0, 0], -MEAN.flatten() / STD.flatten())
    torch.testing.assert_close(tensor[0, 5, 5], (1 - MEAN[0, 0, 0]) / STD[0, 0, 0])


def test_val_pipeline_resizes_to_val_size_deterministically():
    image, target = _painted(30, 40, [(3, 3, 20, 25)])
    pipeline = T.build_transforms("val", val_size=60, max_size=70)
    first, first_target = pipeline(image, target)
    second, _ = pipeline(image, target)
    assert first.shape == (3, 52, 70)  # 60 x 80 would pass max_size 70
    assert torch.equal(first, second)
    _assert_boxes_cover_their_paint(first, first_target, 1)


def test_paper_defaults():
    pipeline = T.build_transforms("train")
    flip, select = pipeline.transforms[:2]
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert select.first.scales == list(range(480, 801, 32)) and select.first.max_size == 1333
    resize_crop_resize = select.second.transforms
    assert resize_crop_resize[0].scales == [400, 500, 600]
    assert (resize_crop_resize[1].min_size, resize_crop_resize[1].max_size) == (384, 600)
    val_resize = T.build_transforms("val").transforms[0]
    assert val_resize.scales == [800] and val_resize.max_size == 1333


def test_empty_target_passes_every_transform():
    image, target = _painted(30, 40, [])
    torch.manual_seed(0)
    for _ in range(5):
        _tensor, out = T.build_transforms("train", **SMALL_TRAIN)(image, target)
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="image_set must be 'train' or 'val'"):
        T.build_transforms("test")
    with pytest.raises(ValueError, match="scales must be a non-empty list"):
        T.RandomResize([])
    with pytest.raises(ValueError, match="min_size <= max_size"):
        T.RandomSizeCrop(50, 40)
    with pytest.raises(TypeError, match="put ToTensor before it"):
        T.Normalize()(*_painted(4, 4, []))


def _random_image(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_resize_pixels_are_pillows_bilinear_resize():
    image, target = _random_image(37, 53), _painted(37, 53, [])[1]
    resized, _ = T.resize(image, target, 20, 91)
    expected = np.asarray(image.resize((91, 20), Image.BILINEAR))
    np.testing.assert_array_equal(np.asarray(resized), expected)


def test_hflip_and_crop_pixels_are_mirrored_and_sliced_arrays():
    image, target = _random_image(30, 40), _painted(30, 40, [])[1]
    pixels = np.asarray(image)
    np.testing.assert_array_equal(np.asarray(T.hflip(image, target)[0]), pixels[:, ::-1])
    cropped, target = T.crop_region(image, target, top=5, left=7, height=20, width=25)
    np.testing.assert_array_equal(np.asarray(cropped), pixels[5:25, 7:32])
    assert target["size"].tolist() == [20, 25]


def test_to_tensor_and_normalize_match_a_numpy_computation():
    image = _random_image(12, 18)
    boxes = np.array([[1.5, 2.0, 10.25, 11.0], [0.0, 0.0, 18.0, 12.0]], dtype=np.float32)
    tensor, target = T.Normalize()(*T.ToTensor()(image, {"boxes": torch.from_numpy(boxes)}))
    mean, std = np.array(T.IMAGENET_MEAN), np.array(T.IMAGENET_STD)
    expected = ((np.asarray(image) / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-6, rtol=0)
    x0, y0, x1, y1 = boxes.T.astype(np.float64)
    expected_boxes = np.stack([(x0 + x1) / 2 / 18, (y0 + y1) / 2 / 12, (x1 - x0) / 18, (y1 - y0) / 12], 1)
    np.testing.assert_allclose(target["boxes"].numpy(), expected_boxes, atol=1e-7, rtol=0)


def test_to_tensor_scales_a_sixteen_bit_grey_image_instead_of_clipping_it():
    gradient = np.linspace(0, 65535, 6 * 40).round().astype(np.uint16).reshape(6, 40)
    tensor, _ = T.ToTensor()(Image.fromarray(gradient), {})
    expected = torch.from_numpy(np.rint(gradient / 65535 * 255) / 255).float()
    torch.testing.assert_close(tensor, expected.expand(3, -1, -1))
