"""models.variants: the one table of published variants agrees with its configs, the reference keys and README."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.variants import PUBLISHED_VARIANTS, Variant, published_variant
from util.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("row", PUBLISHED_VARIANTS, ids=lambda row: row.name)
def test_each_config_builds_the_variant_its_row_describes(row: Variant):
    cfg = load_config(row.config_path)
    assert (cfg.num_feature_levels, cfg.dilation, cfg.with_box_refine, cfg.two_stage) == (
        row.num_feature_levels,
        row.dilation,
        row.with_box_refine,
        row.two_stage,
    )
    assert (cfg.backbone, cfg.hidden_dim, cfg.num_queries, cfg.num_classes, cfg.lr, cfg.lr_backbone) == (
        "resnet50",
        256,
        300,
        91,
        2e-4,
        2e-5,
    )


def test_the_names_are_those_of_the_reference_checkpoints(reference):
    assert sorted(row.name for row in PUBLISHED_VARIANTS) == sorted(reference)


def test_an_unknown_name_lists_the_variants():
    assert published_variant("two_stage").config == "deformable_detr_two_stage.yaml"
    with pytest.raises(ValueError, match="no published variant 'three_stage'; the variants are single_scale, "):
        published_variant("three_stage")


@pytest.mark.parametrize("row", PUBLISHED_VARIANTS, ids=lambda row: row.name)
def test_the_readme_results_table_has_the_row(row: Variant):
    rows = [line for line in README.read_text().splitlines() if f"`configs/{row.config}`" in line]
    assert any(line.startswith("|") and f"| {row.coco_ap} |" in line for line in rows), row.config
