"""Batches of one orientation (datasets.grouping) and the training loader that uses them."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from torch.utils.data import DistributedSampler, SequentialSampler

from datasets.grouping import LANDSCAPE, PORTRAIT, OrientationBatchSampler, orientation_groups
from tests.coco_data import annotation_dict, write_coco


def test_orientation_of_records():
    records = [SimpleNamespace(height=h, width=w) for h, w in [(20, 30), (24, 16), (12, 12), (129, 128)]]
    assert orientation_groups(records) == [LANDSCAPE, PORTRAIT, LANDSCAPE, PORTRAIT]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_batches_of_one_group_then_mixed_remainders(seed, drop_last):
    rng = random.Random(seed)
    size, batch_size, num_groups = rng.randint(1, 60), rng.randint(1, 7), rng.randint(1, 3)
    groups = [rng.randrange(num_groups) for _ in range(size)]
    order = list(range(size))
    rng.shuffle(order)
    sampler = OrientationBatchSampler(order, groups, batch_size, drop_last=drop_last)
    batches = list(sampler)

    expected = size // batch_size if drop_last else math.ceil(size / batch_size)
    assert len(batches) == expected == len(sampler)
    assert all(len(batch) == batch_size for batch in batches[: size // batch_size])
    taken = [index for batch in batches for index in batch]
    assert len(set(taken)) == len(taken)  # no index twice
    # kept: every index once; dropped: fewer than a batch
    assert sorted(taken) == sorted(order) if not drop_last else size - len(taken) < batch_size
    # every group's full batches first, each of one group, its indices in the sampler's order
    for group in range(num_groups):
        in_order = [index for index in order if groups[index] == group]
        whole = len(in_order) // batch_size * batch_size
        grouped = [batch for batch in batches if {groups[index] for index in batch} == {group}]
        assert [index for batch in grouped for index in batch][:whole] == in_order[:whole]
    mixed = [batch for batch in batches if len({groups[index] for index in batch}) > 1]
    assert len(mixed) < num_groups  # the remainders are fewer than a batch per group


def test_every_rank_takes_the_same_number_of_steps():
    # 13 portrait images and 3 landscape: the two ranks' shards differ in their groups but not in their length
    groups = [PORTRAIT] * 13 + [LANDSCAPE] * 3
    dataset = list(range(len(groups)))
    counts = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = OrientationBatchSampler(sampler, groups, batch_size=3)
        counts.append((len(batches), len(list(batches))))
    assert counts == [(2, 2), (2, 2)]


def test_the_epoch_reorders_and_a_seed_repeats():
    groups = [index % 2 for index in range(40)]

    def epoch(number: int) -> list[list[int]]:
        sampler = DistributedSampler(range(40), num_replicas=1, rank=0, shuffle=True, seed=3)
        batches = OrientationBatchSampler(sampler, groups, batch_size=4)
        batches.sampler.set_epoch(number)  # as engine.train does, through .sampler
        return list(batches)

    assert epoch(1) == epoch(1) != epoch(2)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        OrientationBatchSampler(SequentialSampler(range(3)), [0, 0, 0], 0)


@pytest.mark.parametrize("grouped", [True, False])
def test_the_loaders_pad_each_batch_to_one_orientation(tmp_path, grouped):
    from engine.data import build_eval_loader, build_split, build_train_loader
    from util.config import load_config

    data = annotation_dict()
    data["images"] = [  # two landscape, two portrait, in an order that mixes them when not grouped
        {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
        {"id": 2, "file_name": "b.png", "height": 30, "width": 20},
        {"id": 3, "file_name": "c.png", "height": 21, "width": 29},
        {"id": 4, "file_name": "d.png", "height": 29, "width": 21},
    ]
    data["annotations"] = []
    write_coco(tmp_path, data)
    write_coco(tmp_path, data, image_set="val")
    overrides = [f"coco_path={tmp_path}", "train_scales=[20]", "max_size=30", "train_crop=false", "num_classes=4"]
    overrides += ["val_size=20"]
    overrides += ["batch_size=2", "num_workers=0", f"group_by_orientation={str(grouped).lower()}"]
    cfg = load_config(None, overrides)
    shapes = set()
    for seed in range(8):  # shuffled orders: ungrouped, some batch mixes the two orientations
        loader = build_train_loader(build_split("train", cfg), cfg)
        loader.batch_sampler.sampler.set_epoch(seed)
        shapes |= {tuple(batch.images.shape[-2:]) for batch in loader}
    if grouped:
        assert shapes == {(20, 30), (30, 20)}
    else:
        assert (30, 30) in shapes
    # evaluation: every image once, in batches of one orientation when grouped (ids 1, 3 landscape; 2, 4 portrait)
    evaluated = [
        (batch.images.shape[-2:], [t["image_id"].item() for t in batch.targets])
        for batch in build_eval_loader(build_split("val", cfg), cfg)
    ]
    assert sorted(i for _, ids in evaluated for i in ids) == [1, 2, 3, 4]
    if grouped:
        assert sorted((tuple(shape), sorted(ids)) for shape, ids in evaluated) == [
            ((20, 30), [1, 3]),
            ((30, 20), [2, 4]),
        ]
    else:
        assert [shape[0] == shape[1] for shape, _ in evaluated] == [True, True]  # in id order: mixed, square
