"""Batches pad bottom/right with zeros and mark exactly the padding."""

from __future__ import annotations

import pytest
import torch

from datasets.coco import build_dataset
from datasets.collate import Batch, collate_detection, pad_images
from datasets.transforms import build_transforms
from tests.coco_data import write_coco


def _samples() -> list[tuple[torch.Tensor, dict]]:
    sizes = [(4, 6), (7, 3), (5, 5)]
    return [
        (torch.rand(3, h, w) + 1, {"boxes": torch.rand(index, 4), "labels": torch.arange(index)})
        for index, (h, w) in enumerate(sizes)
    ]


def test_images_are_padded_to_the_largest_height_and_width():
    samples = _samples()
    batch = collate_detection(samples)
    assert batch.images.shape == (3, 3, 7, 6)
    for index, (image, _) in enumerate(samples):
        height, width = image.shape[1:]
        assert torch.equal(batch.images[index, :, :height, :width], image)
        assert batch.images[index, :, height:].eq(0).all() and batch.images[index, :, :, width:].eq(0).all()


def test_padding_mask_is_true_exactly_on_padding():
    samples = _samples()
    batch = collate_detection(samples)
    assert batch.padding_mask.shape == (3, 7, 6) and batch.padding_mask.dtype == torch.bool
    for index, (image, _) in enumerate(samples):
        expected = torch.ones(7, 6, dtype=torch.bool)
        expected[: image.shape[1], : image.shape[2]] = False
        assert torch.equal(batch.padding_mask[index], expected)


def test_targets_pass_through_unchanged():
    samples = _samples()
    batch = collate_detection(samples)
    assert [target for _, target in samples] == batch.targets


def test_a_dataloader_yields_batches_that_unpack_and_move():
    loader = torch.utils.data.DataLoader(_samples(), batch_size=2, collate_fn=collate_detection)
    first = next(iter(loader))
    images, padding_mask, targets = first
    assert isinstance(first, Batch) and images.shape == (2, 3, 7, 6) and len(targets) == 2
    moved = first.to("cpu")
    assert torch.equal(moved.padding_mask, padding_mask) and moved.targets[1]["labels"].tolist() == [0]


def test_pad_images_names_the_image_with_the_wrong_shape():
    with pytest.raises(ValueError, match=r"images\[1\] has 1 channels, images\[0\] has 3"):
        pad_images([torch.zeros(3, 2, 2), torch.zeros(1, 4, 4)])


def test_dataset_workers_and_collation_work_together(tmp_path):
    write_coco(tmp_path)
    dataset = build_dataset(
        "train",
        tmp_path,
        build_transforms("train", scales=[16, 24], max_size=40, crop_scales=(16,), crop_size=(8, 16)),
        num_classes=4,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_detection)
    (batch,) = list(loader)
    for index, target in enumerate(batch.targets):
        height, width = target["size"].tolist()
        assert not batch.padding_mask[index, :height, :width].any()
        assert batch.padding_mask[index].sum() == batch.padding_mask[index].numel() - height * width
    assert sorted(target["image_id"].item() for target in batch.targets) == [7, 8, 9]


@pytest.mark.parametrize("divisor", [1, 4, 8])
def test_size_divisibility_rounds_the_batch_up_and_marks_the_extra_as_padding(divisor):
    samples = _samples()  # largest height 7, width 6
    batch = collate_detection(samples, size_divisibility=divisor)
    height, width = -(-7 // divisor) * divisor, -(-6 // divisor) * divisor
    assert batch.images.shape == (3, 3, height, width) and batch.padding_mask.shape == (3, height, width)
    for index, (image, _) in enumerate(samples):
        h, w = image.shape[1:]
        assert torch.equal(batch.images[index, :, :h, :w], image)
        outside = batch.images[index].clone()
        outside[:, :h, :w] = 0
        assert not outside.any()  # zeros elsewhere
        assert not batch.padding_mask[index, :h, :w].any()
        assert batch.padding_mask[index].sum() == height * width - h * w


@pytest.mark.parametrize("divisor", [0, -32, 2.5, True])
def test_size_divisibility_must_be_a_positive_integer(divisor):
    with pytest.raises(ValueError, match="size_divisibility must be an integer >= 1"):
        pad_images([torch.zeros(3, 2, 2)], divisor)


def test_the_config_pads_training_and_evaluation_batches(tmp_path):
    from engine.data import build_eval_loader, build_split, build_train_loader
    from util.config import load_config

    write_coco(tmp_path)
    write_coco(tmp_path, image_set="val")
    overrides = [f"coco_path={tmp_path}", "train_scales=[13]", "max_size=40", "train_crop=false", "val_size=13"]
    overrides += ["num_classes=4", "batch_size=3", "num_workers=0", "size_divisibility=16"]
    cfg = load_config(None, overrides)
    for loader in (build_train_loader(build_split("train", cfg), cfg), build_eval_loader(build_split("val", cfg), cfg)):
        batch = next(iter(loader))
        assert batch.images.shape[-2] % 16 == 0 and batch.images.shape[-1] % 16 == 0
        assert batch.images.shape[-2] >= 16
        for index, target in enumerate(batch.targets):
            height, width = target["size"].tolist()
            assert batch.padding_mask[index].sum() == batch.padding_mask[index].numel() - height * width
