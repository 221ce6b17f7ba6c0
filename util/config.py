"""Flat YAML configs with one level of ``_base_`` inheritance and ``key=value`` overrides.

Keys are named like the original Deformable DETR command-line flags. Every key has a default in :class:`Config`;
a key that is not there, in a file or an override, is an error that names it::

    cfg = load_config("configs/deformable_detr.yaml", overrides=["hidden_dim=128", "two_stage=true"])
    cfg.hidden_dim  # 128
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "_base_"


@dataclasses.dataclass
class Config:
    """Every setting, with the original implementation's defaults."""

    # model: backbone
    backbone: str = "resnet50"
    dilation: bool = False
    pretrained_backbone: bool | str = True  # true: download ImageNet weights; false: random; a str: a local file
    # true: trainable BatchNorm and every stage trained, for a backbone without pretrained weights (not the
    # original's setting, which freezes the normalisation, the stem and the first stage of a pretrained ResNet)
    backbone_from_scratch: bool = False
    # Deformable ConvNets: the ResNet stages (3, 4, 5 = conv3_x .. conv5_x) whose 3x3 convolutions become
    # deformable (v2 with dcn_modulated); their offset predictors train at lr_backbone * lr_offset_mult
    dcn_stages: list[int] = dataclasses.field(default_factory=list)
    dcn_modulated: bool = False
    lr_offset_mult: float = 0.1
    position_embedding_scale: float = 2 * math.pi
    num_feature_levels: int = 4
    # model: transformer
    hidden_dim: int = 256
    dim_feedforward: int = 1024
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    attention_backend: str = "auto"  # ops.ms_deform_attn backend: auto | pytorch | cpu | cuda
    # model: variants and heads
    with_box_refine: bool = False
    two_stage: bool = False
    num_classes: int = 91
    aux_loss: bool = True
    # matcher
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    # loss
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    # optimisation
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 2
    epochs: int = 50
    lr_drop: int = 40
    clip_max_norm: float = 0.1
    lr_linear_proj_names: list[str] = dataclasses.field(
        default_factory=lambda: ["reference_points", "sampling_offsets"]
    )  # parameters at lr * lr_linear_proj_mult
    lr_backbone_names: list[str] = dataclasses.field(default_factory=lambda: ["backbone.0"])  # at lr_backbone
    amp: str = "none"  # autocast: none | bfloat16 | float16 (float16 with a gradient scaler)
    # data: image sizes of the transforms (the paper's by default)
    train_scales: list[int] = dataclasses.field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333  # longer side at most this, in training and evaluation
    train_crop: bool = True
    crop_scales: list[int] = dataclasses.field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = dataclasses.field(default_factory=lambda: [384, 600])  # [min, max] side of the crop
    val_size: int = 800
    # run
    coco_path: str = "data/coco"
    output_dir: str = "outputs"
    device: str = "cuda"
    seed: int = 42
    resume: str = ""  # a checkpoint to continue from (train) or to evaluate / predict with
    # train: a checkpoint (ours or the original's) whose weights start a new run at epoch 0 with a fresh optimizer;
    # its class heads are used only when num_classes matches, otherwise they start from their initialisation
    finetune_from: str = ""
    num_workers: int = 2
    eval_every: int = 1  # evaluate after every eval_every-th epoch and after the last
    save_every: int = 5  # also keep checkpointNNNN.pth every save_every epochs and before lr_drop; 0: never
    print_every: int = 10  # progress line every print_every iterations (when not a terminal)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The defaults, then the ``_base_`` file of ``path`` (relative to ``path``), then ``path``, then ``overrides``.

    Args:
        path: a YAML file of flat ``key: value`` pairs, or None for the defaults alone.
        overrides: ``"key=value"`` strings, the value read as YAML (``lr=1e-4``, ``two_stage=true``).

    Raises:
        KeyError: a key that :class:`Config` does not have, naming it and where it came from.
        ValueError: a value of the wrong type, or an override without ``=``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_with_base(Path(path)))
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"override {override!r} must look like key=value")
        values[key.strip()] = (yaml.safe_load(text) if text.strip() else "", f"override {override!r}")
    hints = typing.get_type_hints(Config)
    checked = {key: _check_type(key, value, hints[key], origin) for key, (value, origin) in values.items()}
    return Config(**checked)


def _read_with_base(path: Path) -> dict[str, tuple[Any, str]]:
    """Key -> (value, where it came from); the file's own keys win over its base's."""
    own = _read_yaml(path)
    values: dict[str, tuple[Any, str]] = {}
    if BASE_KEY in own:
        base_path = path.parent / str(own.pop(BASE_KEY))
        base = _read_yaml(base_path)
        if BASE_KEY in base:
            raise ValueError(f"{base_path}: a _base_ file cannot have a _base_ of its own (one level only)")
        values.update({key: (value, str(base_path)) for key, value in base.items()})
    values.update({key: (value, str(path)) for key, value in own.items()})
    return values


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(f"{path}: a config is a mapping of key: value, got {type(content).__name__}")
    return content


def _check_type(key: str, value: Any, expected: Any, origin: str) -> Any:
    """``value`` as the type ``expected`` of ``key``: ints pass as floats, nothing else is converted."""
    fields = {field.name for field in dataclasses.fields(Config)}
    if key not in fields:
        raise KeyError(f"unknown config key {key!r} in {origin}; known keys: {', '.join(sorted(fields))}")
    if typing.get_origin(expected) is list:
        return _check_list(key, value, typing.get_args(expected)[0], origin)
    allowed = typing.get_args(expected) or (expected,)
    if isinstance(value, bool) and bool not in allowed:  # bool is an int: do not let true pass as 1
        raise ValueError(f"config key {key!r} in {origin} must be {_names(allowed)}, got {value!r}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, allowed):
        raise ValueError(f"config key {key!r} in {origin} must be {_names(allowed)}, got {value!r}")
    return value


def _check_list(key: str, value: Any, item_type: type, origin: str) -> list:
    """A list of ``item_type`` (ints pass as floats); YAML ``[1, 2]`` or a single item."""
    items = value if isinstance(value, list) else [value]
    if any(
        isinstance(item, bool) or not isinstance(item, (item_type, int) if item_type is float else item_type)
        for item in items
    ):
        raise ValueError(f"config key {key!r} in {origin} must be a list of {item_type.__name__}, got {value!r}")
    return [item_type(item) for item in items]


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(kind.__name__ for kind in types)
