"""The published Deformable DETR variants: one row each, read by ``models.describe``, ``models.convert``,
``benchmarks.model``, the tests and the README's results table.

A row holds only what no config says (its name, title, the original's COCO AP and the file); what the variant is
(feature levels, dilation, box refinement, two-stage, sizes) is read from its file in configs/::

    from models.variants import PUBLISHED_VARIANTS, published_variant

    published_variant("two_stage").config_path  # .../configs/deformable_detr_two_stage.yaml
    published_variant("two_stage").load_config().two_stage  # True
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from util.config import Config, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A published variant, as the original trained it on COCO.

    ``name`` is the key of the original checkpoints' reference (tests/data/checkpoint_keys.json); ``coco_ap``
    is the COCO val2017 box AP the original reports (table 1 of the paper and the original code's checkpoints)."""

    name: str
    config: str  # the file in configs/
    title: str
    coco_ap: float

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config

    def load_config(self, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """The variant's config file read by ``util.config.load_config``, then ``overrides``."""
        return load_config(self.config_path, overrides)


PUBLISHED_VARIANTS: tuple[Variant, ...] = (
    Variant("single_scale", "deformable_detr_single_scale.yaml", "single scale", coco_ap=39.4),
    Variant("single_scale_dc5", "deformable_detr_single_scale_dc5.yaml", "single scale, DC5", coco_ap=41.5),
    Variant("deformable_detr", "deformable_detr.yaml", "multi-scale", coco_ap=44.5),
    Variant("box_refine", "deformable_detr_box_refine.yaml", "+ iterative box refinement", coco_ap=46.2),
    Variant("two_stage", "deformable_detr_two_stage.yaml", "+ two-stage", coco_ap=46.9),
)


def published_variant(name: str) -> Variant:
    """The row called ``name``; a ``ValueError`` lists the names for any other."""
    for variant in PUBLISHED_VARIANTS:
        if variant.name == name:
            return variant
    raise ValueError(f"no published variant {name!r}; the variants are {', '.join(v.name for v in PUBLISHED_VARIANTS)}")
