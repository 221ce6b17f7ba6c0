"""Datasets and loaders of a run: the config's image sizes, one shard of the data per rank.

Training shuffles with a ``DistributedSampler`` (also in one process, so that a seed and an epoch fix the order,
and a resumed run sees the batches it would have seen); call ``set_epoch`` on it every epoch. Evaluation splits
the images over ranks without shuffling; the sampler repeats a few images to give every rank the same count, and
the evaluator counts each image id once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from datasets import CocoDetection, build_dataset, build_transforms, collate_detection
from datasets.grouping import OrientationBatchSampler, orientation_groups
from datasets.transforms import Compose
from util.config import Config
from util.errors import UserError


def build_config_transforms(image_set: str, cfg: Config) -> Compose:
    """The ``"train"`` or ``"val"`` transforms with the sizes of ``cfg`` (``train_scales``, ``max_size``,
    ``train_crop``, ``crop_scales``, ``crop_size``, ``val_size``)."""
    if len(cfg.crop_size) != 2:
        raise ValueError(f"crop_size must be [min, max], got {cfg.crop_size}")
    return build_transforms(
        image_set,
        scales=cfg.train_scales,
        max_size=cfg.max_size,
        crop=cfg.train_crop,
        crop_scales=cfg.crop_scales,
        crop_size=(cfg.crop_size[0], cfg.crop_size[1]),
        val_size=cfg.val_size,
    )


def build_split(image_set: str, cfg: Config) -> CocoDetection:
    """The ``image_set`` split of ``cfg.coco_path`` with its transforms."""
    return build_dataset(image_set, cfg.coco_path, build_config_transforms(image_set, cfg), cfg.num_classes)


def _collate(cfg: Config) -> Callable:
    """The loaders' ``collate_fn``: batches padded to a multiple of ``cfg.size_divisibility`` (picklable, for
    workers)."""
    return functools.partial(collate_detection, size_divisibility=cfg.size_divisibility)


def build_train_loader(dataset: CocoDetection, cfg: Config, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled batches of ``cfg.batch_size`` images per rank, the last incomplete batch dropped; with
    ``cfg.group_by_orientation`` each batch of landscape or of portrait images (``datasets.grouping``).

    Its workers start anew every epoch, seeded from the global torch generator (which every epoch reseeds, see
    ``engine.train.epoch_seed``): each rank and each epoch gets its own augmentations, the same after a resume.
    """
    if len(dataset) < cfg.batch_size * world_size:
        raise UserError(
            f"the training split has {len(dataset)} images, fewer than one batch of "
            f"batch_size={cfg.batch_size} on each of {world_size} processes"
        )
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    return _loader(dataset, sampler, cfg, drop_last=True)


def build_eval_loader(dataset: CocoDetection, cfg: Config, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Every image once per rank's share (a few repeated to even the shares), in order; with
    ``cfg.group_by_orientation`` in batches of one orientation as in training (the model sees the padding it was
    trained with), in order within each."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return _loader(dataset, sampler, cfg, drop_last=False)


def _loader(dataset: CocoDetection, sampler: DistributedSampler, cfg: Config, drop_last: bool) -> DataLoader:
    """Batches of ``cfg.batch_size`` in ``sampler``'s order, of one orientation with ``cfg.group_by_orientation``."""
    if cfg.group_by_orientation:
        groups = orientation_groups(dataset.records)
        batches = OrientationBatchSampler(sampler, groups, cfg.batch_size, drop_last=drop_last)
    else:
        batches = BatchSampler(sampler, cfg.batch_size, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_collate(cfg), num_workers=cfg.num_workers)
