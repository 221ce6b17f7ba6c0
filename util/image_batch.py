"""Pad images of different sizes into one batch with a padding mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad images to the largest height and width, at the bottom and on the right.

    Args:
        images: B tensors (3, H_i, W_i) of one dtype and device.
        size_divisibility: round the batch's height and width up to a multiple of this (1: the largest image's);
            fewer distinct batch shapes let oneDNN reuse its convolution kernels between batches.

    Returns:
        batch (B, 3, H, W) and padding_mask (B, H, W) bool, True on padding.
    """
    if len(images) == 0:
        raise ValueError("images must hold at least one image")
    if isinstance(size_divisibility, bool) or not isinstance(size_divisibility, int) or size_divisibility < 1:
        raise ValueError(f"size_divisibility must be an integer >= 1, got {size_divisibility!r}")
    for index, image in enumerate(images):
        if image.dim() != 3:
            raise ValueError(f"images[{index}] must be (C, H, W), got shape {tuple(image.shape)}")
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    height, width = (-(-side // size_divisibility) * size_divisibility for side in (height, width))
    batch = images[0].new_zeros(len(images), channels, height, width)
    padding_mask = torch.ones(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for index, image in enumerate(images):
        if image.shape[0] != channels:
            raise ValueError(f"images[{index}] has {image.shape[0]} channels, images[0] has {channels}")
        batch[index, :, : image.shape[1], : image.shape[2]] = image
        padding_mask[index, : image.shape[1], : image.shape[2]] = False
    return batch, padding_mask
