"""Batching images of different sizes: zero-pad at the bottom and right, and say where the padding is."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class Batch(NamedTuple):
    """``images`` (B, 3, Hmax, Wmax): each image in the top-left corner, zeros elsewhere;
    ``padding_mask`` (B, Hmax, Wmax) bool, True on padding; ``targets`` the B target dicts, unchanged (their boxes
    stay normalised to their own unpadded image)."""

    images: torch.Tensor
    padding_mask: torch.Tensor
    targets: list[dict[str, torch.Tensor]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The batch with every tensor, the targets' included, on ``device``."""
        targets = [{key: value.to(device, non_blocking=non_blocking) for key, value in target.items()}
                   for target in self.targets]
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.padding_mask.to(device, non_blocking=non_blocking), targets)


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H_i, W_i) images -> ``images`` (B, C, Hmax, Wmax) zero-padded bottom/right, ``padding_mask``
    (B, Hmax, Wmax) bool True on padding."""
    if not images:
        raise ValueError("pad_images needs at least one image")
    channels = images[0].shape[0]
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != channels:
            raise ValueError(f"images[{index}] has shape {tuple(image.shape)}, expected ({channels}, H, W)")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros(len(images), channels, height, width)
    padding_mask = torch.ones(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for index, image in enumerate(images):
        batch[index, :, : image.shape[1], : image.shape[2]] = image
        padding_mask[index, : image.shape[1], : image.shape[2]] = False
    return batch, padding_mask


def collate_detection(samples: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> Batch:
    """``collate_fn`` for a ``DataLoader`` over a detection dataset of ``(image (3, H, W), target)`` items."""
    images, padding_mask = pad_images([image for image, _ in samples])
    return Batch(images, padding_mask, [target for _, target in samples])
