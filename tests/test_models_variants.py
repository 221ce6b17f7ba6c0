"""models.variants: the one table of published variants reads its configs and agrees with the reference keys and
README."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.variants import CONFIG_DIR, PUBLISHED_VARIANTS, Variant, published_variant
from util.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("row", PUBLISHED_VARIANTS, ids=lambda row: row.name)
def test_each_config_has_the_original_sizes_and_learning_rates(row: Variant):
    cfg = row.load_config()
    assert (cfg.backbone, cfg.hidden_dim, cfg.num_queries, cfg.num_classes, cfg.lr, cfg.lr_backbone) == (
        "resnet50",
        256,
        300,
        91,
        2e-4,
        2e-5,
    )


def test_the_rows_read_five_different_variants_from_their_configs():
    configs = [row.load_config() for row in PUBLISHED_VARIANTS]
    kinds = {(cfg.num_feature_levels, cfg.dilation, cfg.with_box_refine, cfg.two_stage) for cfg in configs}
    assert len(kinds) == len(PUBLISHED_VARIANTS) == 5
    assert [row.name for row, cfg in zip(PUBLISHED_VARIANTS, configs) if cfg.dilation] == ["single_scale_dc5"]


def test_load_config_reads_the_file_then_the_overrides():
    cfg = published_variant("two_stage").load_config(["num_queries=7"])
    assert (cfg.two_stage, cfg.with_box_refine, cfg.num_feature_levels, cfg.num_queries) == (True, True, 4, 7)
    assert published_variant("deformable_detr").load_config() == load_config(CONFIG_DIR / "deformable_detr.yaml")


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
