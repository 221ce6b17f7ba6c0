"""The published Deformable DETR variants: one row each, read by ``models.describe``, ``benchmarks.model``, the
tests and the README's results table.

    from models.variants import PUBLISHED_VARIANTS, published_variant

    published_variant("two_stage").config_path  # .../configs/deformable_detr_two_stage.yaml
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A published variant: ResNet-50, hidden 256, 300 queries, 91 classes (COCO), trained 50 epochs.

    ``name`` is the key of the original checkpoints' reference (tests/data/checkpoint_keys.json); ``coco_ap``
    is the COCO val2017 box AP the original reports (table 1 of the paper and the original code's checkpoints)."""

    name: str
    config: str  # the file in configs/
    title: str
    num_feature_levels: int
    dilation: bool
    with_box_refine: bool
    two_stage: bool
    coco_ap: float

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config


PUBLISHED_VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="single_scale",
        config="deformable_detr_single_scale.yaml",
        title="single scale",
        num_feature_levels=1,
        dilation=False,
        with_box_refine=False,
        two_stage=False,
        coco_ap=39.4,
    ),
    Variant(
        name="single_scale_dc5",
        config="deformable_detr_single_scale_dc5.yaml",
        title="single scale, DC5",
        num_feature_levels=1,
        dilation=True,
        with_box_refine=False,
        two_stage=False,
        coco_ap=41.5,
    ),
    Variant(
        name="deformable_detr",
        config="deformable_detr.yaml",
        title="multi-scale",
        num_feature_levels=4,
        dilation=False,
        with_box_refine=False,
        two_stage=False,
        coco_ap=44.5,
    ),
    Variant(
        name="box_refine",
        config="deformable_detr_box_refine.yaml",
        title="+ iterative box refinement",
        num_feature_levels=4,
        dilation=False,
        with_box_refine=True,
        two_stage=False,
        coco_ap=46.2,
    ),
    Variant(
        name="two_stage",
        config="deformable_detr_two_stage.yaml",
        title="+ two-stage",
        num_feature_levels=4,
        dilation=False,
        with_box_refine=True,
        two_stage=True,
        coco_ap=46.9,
    ),
)


def published_variant(name: str) -> Variant:
    """The row called ``name``; a ``ValueError`` lists the names for any other."""
    for variant in PUBLISHED_VARIANTS:
        if variant.name == name:
            return variant
    raise ValueError(f"no published variant {name!r}; the variants are {', '.join(v.name for v in PUBLISHED_VARIANTS)}")
