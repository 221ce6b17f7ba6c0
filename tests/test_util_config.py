"""util.config: defaults, _base_ inheritance, overrides, and errors that name the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from util.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_original_flags():
    cfg = load_config()
    assert (cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.num_queries, cfg.num_classes) == (256, 8, 6, 300, 91)
    assert cfg.position_embedding_scale == pytest.approx(2 * math.pi)


def test_file_inherits_its_base_and_overrides_it(tmp_path):
    (tmp_path / "base.yaml").write_text("hidden_dim: 128\nnheads: 4\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nnheads: 2\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.hidden_dim, cfg.nheads) == (128, 2)


def test_overrides_win_and_are_read_as_yaml():
    cfg = load_config(CONFIGS / "deformable_detr.yaml", overrides=["two_stage=true", "lr=1e-4", "num_queries=100"])
    assert cfg.two_stage is True and cfg.lr == 1e-4 and cfg.num_queries == 100


def test_int_is_accepted_for_float_key():
    assert load_config(overrides=["dropout=0"]).dropout == 0.0


def test_pretrained_backbone_takes_bool_or_path():
    assert load_config(overrides=["pretrained_backbone=false"]).pretrained_backbone is False
    assert load_config(overrides=["pretrained_backbone=/x/r50.pth"]).pretrained_backbone == "/x/r50.pth"


def test_unknown_key_in_file_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("hiden_dim: 128\n")
    with pytest.raises(KeyError, match="hiden_dim"):
        load_config(tmp_path / "bad.yaml")


def test_unknown_key_in_override_is_named():
    with pytest.raises(KeyError, match="num_querys"):
        load_config(overrides=["num_querys=3"])


def test_wrong_type_is_named():
    with pytest.raises(ValueError, match="hidden_dim"):
        load_config(overrides=["hidden_dim=abc"])
    with pytest.raises(ValueError, match="enc_layers"):
        load_config(overrides=["enc_layers=true"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ValueError, match="key=value"):
        load_config(overrides=["two_stage"])


def test_base_of_a_base_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("nheads: 4\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\n")
    with pytest.raises(ValueError, match="one level"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "name, levels, dilation, refine, two_stage",
    [
        ("deformable_detr", 4, False, False, False),
        ("deformable_detr_single_scale", 1, False, False, False),
        ("deformable_detr_single_scale_dc5", 1, True, False, False),
        ("deformable_detr_box_refine", 4, False, True, False),
        ("deformable_detr_two_stage", 4, False, True, True),
    ],
)
def test_variant_configs_hold_the_published_settings(name, levels, dilation, refine, two_stage):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.num_feature_levels, cfg.dilation, cfg.with_box_refine, cfg.two_stage) == (
        levels,
        dilation,
        refine,
        two_stage,
    )
    assert (cfg.backbone, cfg.hidden_dim, cfg.num_queries, cfg.lr, cfg.lr_backbone) == (
        "resnet50",
        256,
        300,
        2e-4,
        2e-5,
    )


def test_to_dict_round_trips():
    cfg = load_config(overrides=["hidden_dim=64"])
    assert Config(**cfg.to_dict()) == cfg
