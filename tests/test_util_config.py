"""util.config: defaults, _base_ inheritance, overrides, and errors that name the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from util.config import Config, load_config
from util.errors import UserError

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


def test_unknown_key_in_file_names_the_file_and_the_close_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("hiden_dim: 128\n")
    with pytest.raises(UserError, match=r"unknown config key 'hiden_dim' in .*bad\.yaml; did you mean 'hidden_dim'\?"):
        load_config(tmp_path / "bad.yaml")


def test_unknown_key_in_override_names_opts_and_the_close_key():
    with pytest.raises(UserError, match=r"'num_querys' in --opts num_querys=3; did you mean 'num_queries'"):
        load_config(overrides=["num_querys=3"])


def test_unknown_key_without_a_close_one_points_to_the_key_list():
    with pytest.raises(UserError, match=r"'foo' in --opts foo=1; every key.* util/config\.py") as error:
        load_config(overrides=["foo=1"])
    assert "did you mean" not in str(error.value)


def test_a_key_that_is_not_a_name_is_unknown(tmp_path):
    (tmp_path / "numbers.yaml").write_text("1: 2\n")
    with pytest.raises(UserError, match=r"unknown config key 1 in .*numbers\.yaml"):
        load_config(tmp_path / "numbers.yaml")


def test_wrong_type_is_named():
    with pytest.raises(UserError, match="hidden_dim"):
        load_config(overrides=["hidden_dim=abc"])
    with pytest.raises(UserError, match="enc_layers"):
        load_config(overrides=["enc_layers=true"])


def test_override_without_equals_is_an_error():
    with pytest.raises(UserError, match="key=value"):
        load_config(overrides=["two_stage"])


def test_override_that_is_not_yaml_names_opts():
    with pytest.raises(UserError, match=r"--opts train_scales=\[96,: the value is not valid YAML"):
        load_config(overrides=["train_scales=[96,"])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("lr: 1e-4\ntrain_scales: [96, 128\nepochs: 3\n")
    with pytest.raises(UserError, match=r"broken\.yaml is not valid YAML: line \d+, column \d+"):
        load_config(tmp_path / "broken.yaml")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"config file .*absent\.yaml does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_missing_base_file_names_the_file_that_asks_for_it(tmp_path):
    (tmp_path / "child.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(UserError, match=r"child\.yaml: its _base_ file .*nowhere\.yaml does not exist"):
        load_config(tmp_path / "child.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=-1", "'lr' in --opts lr=-1 must be >= 0"),
        ("lr_backbone=-1e-5", "'lr_backbone' .* must be >= 0"),
        ("epochs=0", "'epochs' .* must be >= 1"),
        ("epochs=-1", "'epochs' .* must be >= 1"),
        ("batch_size=0", "'batch_size' .* must be >= 1"),
        ("lr_drop=0", "'lr_drop' .* must be >= 1"),
        ("weight_decay=-0.1", "'weight_decay' .* must be >= 0"),
        ("clip_max_norm=-1", "'clip_max_norm' .* must be >= 0"),
        ("dropout=1", r"'dropout' .* must be in \[0, 1\)"),
        ("focal_alpha=1.5", r"'focal_alpha' .* must be in \[0, 1\]"),
        ("num_queries=0", "'num_queries' .* must be >= 1"),
        ("num_classes=0", "'num_classes' .* must be >= 1"),
        ("num_feature_levels=0", "'num_feature_levels' .* must be >= 1"),
        ("amp=fp16", "'amp' .* must be one of none, bfloat16, float16"),
        ("attention_backend=gpu", "'attention_backend' .* must be one of auto, pytorch, cpu, cuda"),
        ("train_scales=[]", "'train_scales' .* must be a non-empty list of sizes >= 1"),
        ("crop_size=[600,400]", "'crop_size' .* must be \\[min, max\\] with 1 <= min <= max"),
        ("device=gpu", "'device' .* must be cpu, cuda or cuda:N"),
        ("num_workers=-1", "'num_workers' .* must be >= 0"),
        ("print_every=0", "'print_every' .* must be >= 1"),
        ("dist_timeout_minutes=0", "'dist_timeout_minutes' .* must be > 0"),
    ],
)
def test_value_out_of_range_is_refused_when_loaded(override, message):
    with pytest.raises(UserError, match=message):
        load_config(overrides=[override])


def test_value_out_of_range_in_a_file_names_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("batch_size: 0\n")
    with pytest.raises(UserError, match=r"'batch_size' in .*run\.yaml must be >= 1, got 0"):
        load_config(tmp_path / "run.yaml")


def test_hidden_dim_not_a_multiple_of_nheads_names_both_origins():
    with pytest.raises(UserError, match=r"hidden_dim \(256, from .*deformable_detr\.yaml\).*nheads \(3, from --opts"):
        load_config(CONFIGS / "deformable_detr.yaml", overrides=["nheads=3"])


def test_every_shipped_config_is_valid():
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_config(path)


def test_base_of_a_base_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("nheads: 4\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\n")
    with pytest.raises(UserError, match="one level"):
        load_config(tmp_path / "c.yaml")


def test_to_dict_round_trips():
    cfg = load_config(overrides=["hidden_dim=64"])
    assert Config(**cfg.to_dict()) == cfg
