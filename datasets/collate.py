"""Batching images of different sizes: zero-pad at the bottom and right, and say where the padding is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from util.image_batch import pad_images  # the one padding routine, shared with the model's list-of-images input


class Batch(NamedTuple):
    """``images`` (B, 3, Hmax, Wmax): each image in the top-left corner, zeros elsewhere;
    ``padding_mask`` (B, Hmax, Wmax) bool, True on padding; ``targets`` the B target dicts, unchanged (their boxes
    stay normalised to their own unpadded image)."""

    images: torch.Tensor
    padding_mask: torch.Tensor
    targets: list[dict[str, torch.Tensor]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch with every tensor, the targets' included, on ``device``."""
        targets = [
            {key: value.to(device, non_blocking=non_blocking) for key, value in target.items()}
            for target in self.targets
        ]
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            self.padding_mask.to(device, non_blocking=non_blocking),
            targets,
        )


def collate_detection(
    samples: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]], size_divisibility: int = 1
) -> Batch:
    """``collate_fn`` for a ``DataLoader`` over a detection dataset of ``(image (3, H, W), target)`` items; the
    batch's height and width are rounded up to a multiple of ``size_divisibility`` (see ``pad_images``)."""
    images, padding_mask = pad_images([image for image, _ in samples], size_divisibility)
    return Batch(images, padding_mask, [target for _, target in samples])
