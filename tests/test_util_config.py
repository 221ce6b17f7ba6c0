"""util.config: defaults, _base_ chains, overrides, and errors that name the key, the file and the line."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from util.config import FLOAT_KEYS, Config, load_config
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


def test_hidden_dim_not_a_multiple_of_nheads_names_both_origins(tmp_path):
    (tmp_path / "run.yaml").write_text("hidden_dim: 128\n")
    with pytest.raises(UserError, match=r"hidden_dim \(128, from .*run\.yaml\).*nheads \(3, from --opts nheads=3\)"):
        load_config(tmp_path / "run.yaml", overrides=["nheads=3"])
    with pytest.raises(UserError, match=r"hidden_dim \(256, from the defaults\)"):
        load_config(CONFIGS / "deformable_detr.yaml", overrides=["nheads=3"])


def test_every_shipped_config_is_valid():
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_config(path)


def test_a_chain_of_three_bases_resolves_each_path_relative_to_the_file_that_names_it(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "runs" / "small").mkdir(parents=True)
    (tmp_path / "shared" / "model.yaml").write_text("hidden_dim: 128\nnheads: 4\nenc_layers: 3\n")
    (tmp_path / "shared" / "train.yaml").write_text("_base_: model.yaml\nnheads: 2\nlr: 1.0e-3\n")
    (tmp_path / "runs" / "small.yaml").write_text("_base_: ../shared/train.yaml\nenc_layers: 1\n")
    (tmp_path / "runs" / "small" / "run.yaml").write_text("_base_: ../small.yaml\nepochs: 3\n")
    cfg = load_config(tmp_path / "runs" / "small" / "run.yaml")
    assert (cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.lr, cfg.epochs) == (128, 2, 1, 1e-3, 3)


def test_a_value_from_the_far_end_of_a_chain_is_named_with_its_file(tmp_path):
    (tmp_path / "a.yaml").write_text("batch_size: 0\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\n")
    with pytest.raises(UserError, match=r"'batch_size' in .*a\.yaml must be >= 1"):
        load_config(tmp_path / "c.yaml")


def test_a_base_cycle_names_its_files_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: c.yaml\n")
    (tmp_path / "c.yaml").write_text("_base_: ./a.yaml\n")
    (tmp_path / "run.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(UserError, match=r"c\.yaml: its _base_ chain comes back to a file of its own") as error:
        load_config(tmp_path / "run.yaml")
    files = [f"{tmp_path / name}" for name in ("a.yaml", "b.yaml", "c.yaml", "./a.yaml")]
    assert f"({' -> '.join(files)})" in str(error.value)
    assert "run.yaml ->" not in str(error.value)  # run.yaml leads into the cycle but is not part of it


def test_a_file_that_is_its_own_base_is_a_cycle(tmp_path):
    (tmp_path / "self.yaml").write_text("_base_: self.yaml\n")
    with pytest.raises(UserError, match=r"self\.yaml -> .*self\.yaml\); remove one of these _base_ lines"):
        load_config(tmp_path / "self.yaml")


def test_a_missing_base_deep_in_a_chain_names_the_file_that_asks_for_it(tmp_path):
    (tmp_path / "b.yaml").write_text("_base_: gone/a.yaml\n")
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\n")
    with pytest.raises(UserError, match=r"b\.yaml: its _base_ file .*gone/a\.yaml does not exist"):
        load_config(tmp_path / "c.yaml")


def test_a_base_that_is_not_a_file_name_is_refused(tmp_path):
    (tmp_path / "run.yaml").write_text("_base_: [a.yaml, b.yaml]\n")
    with pytest.raises(UserError, match=r"run\.yaml: _base_ must name one file .*got \['a\.yaml', 'b\.yaml'\]"):
        load_config(tmp_path / "run.yaml")


def test_a_key_stated_twice_names_the_key_the_file_and_the_second_line(tmp_path):
    (tmp_path / "twice.yaml").write_text("lr: 1.0e-4\nepochs: 3\nlr: 2.0e-4\n")
    with pytest.raises(UserError, match=r"twice\.yaml is not valid YAML: line 3, column 1: key 'lr' stated twice "):
        load_config(tmp_path / "twice.yaml")


def test_a_key_stated_twice_on_one_line_is_refused(tmp_path):
    (tmp_path / "flow.yaml").write_text("{epochs: 3, epochs: 4}\n")
    with pytest.raises(UserError, match=r"line 1, column 13: key 'epochs' stated twice \(first on line 1\)"):
        load_config(tmp_path / "flow.yaml")


def test_a_key_twice_in_an_override_value_is_refused():
    with pytest.raises(UserError, match=r"--opts coco_path=\{a: 1, a: 2\}: the value is not valid YAML .*'a' stated"):
        load_config(overrides=["coco_path={a: 1, a: 2}"])


def test_every_float_key_is_checked_for_finite_values():
    assert {"lr", "lr_offset_mult", "position_embedding_scale", "dist_timeout_minutes"} <= set(FLOAT_KEYS)
    for key in FLOAT_KEYS:
        with pytest.raises(UserError, match=f"'{key}' in --opts {key}=.inf must be a finite number, got inf"):
            load_config(overrides=[f"{key}=.inf"])


@pytest.mark.parametrize("text, shown", [("1e400", "inf"), ("-1e400", "-inf"), (".nan", "nan"), (".NaN", "nan")])
def test_a_non_finite_override_is_refused(text, shown):
    with pytest.raises(UserError, match=f"'lr' in --opts lr={re.escape(text)} must be a finite number, got {shown}$"):
        load_config(overrides=[f"lr={text}"])


def test_a_non_finite_value_in_a_file_names_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("weight_decay: .nan\n")
    with pytest.raises(UserError, match=r"'weight_decay' in .*run\.yaml must be a finite number, got nan"):
        load_config(tmp_path / "run.yaml")


def test_to_dict_round_trips():
    cfg = load_config(overrides=["hidden_dim=64"])
    assert Config(**cfg.to_dict()) == cfg
