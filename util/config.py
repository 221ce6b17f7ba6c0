"""Flat YAML configs with ``_base_`` inheritance and ``key=value`` overrides.

Keys are named like the original Deformable DETR command-line flags. Every key has a default in :class:`Config`;
a key that is not there, in a file or an override, is an error that names it. A file names at most one
``_base_`` (relative to itself), which may name its own, to any depth; each file states only what differs::

    cfg = load_config("configs/deformable_detr.yaml", overrides=["hidden_dim=128", "two_stage=true"])
    cfg.hidden_dim  # 128
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from util.errors import UserError

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
    # autocast: none | bfloat16 | float16 (float16 with a gradient scaler) | auto (bfloat16 on a CPU with native
    # bfloat16, where it also makes the backbone channels-last; none elsewhere)
    amp: str = "none"
    # eval, predict, visualize: weights in this dtype (models.inference): auto (bfloat16 on a CPU with native
    # bfloat16, else float32) | float32 | bfloat16; amp applies to them only with float32 weights
    inference_dtype: str = "auto"
    # data: image sizes of the transforms (the paper's by default)
    train_scales: list[int] = dataclasses.field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333  # longer side at most this, in training and evaluation
    train_crop: bool = True
    crop_scales: list[int] = dataclasses.field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = dataclasses.field(default_factory=lambda: [384, 600])  # [min, max] side of the crop
    val_size: int = 800
    # training and evaluation batches: height and width padded up to a multiple of this (1: the largest image's,
    # as the original); 32 gives few distinct batch shapes, so oneDNN reuses its CPU kernels (see the demo)
    size_divisibility: int = 1
    # training and evaluation batches of one orientation (landscape or portrait, datasets.grouping): less padding,
    # faster steps; false: batches as the original, any images together
    group_by_orientation: bool = False
    # run
    coco_path: str = "data/coco"
    output_dir: str = "outputs"
    # train: replace a run already in output_dir (its checkpoints, log and metrics are deleted); false: refuse it
    overwrite: bool = False
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
    # several processes: a rank waiting longer than this for another in a collective stops the job with a message
    dist_timeout_minutes: float = 30.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The defaults, then the chain of ``_base_`` files of ``path`` (each relative to the file naming it) from the
    farthest to the nearest, then ``path``, then ``overrides``.

    Args:
        path: a YAML file of flat ``key: value`` pairs, or None for the defaults alone.
        overrides: ``"key=value"`` strings (``--opts`` of main.py), the value read as YAML (``lr=1e-4``,
            ``two_stage=true``).

    Raises:
        UserError: a missing file, a YAML syntax error or a key stated twice in one mapping (naming the file and
            line); a ``_base_`` chain that comes back to a file of its own (naming the files of the cycle); a key
            that :class:`Config` does not have (naming it, where it came from, and the keys it resembles); a value
            of the wrong type, not finite, or out of its range (see ``VALID_VALUES``); an override without ``=``.
    """
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        values.update(_read_with_base(Path(path)))
    for override in overrides:
        key, value = _parse_override(override)
        values[key] = (value, f"--opts {override}")
    hints = typing.get_type_hints(Config)
    for key, (_, origin) in values.items():
        if key not in hints:
            raise UserError(_unknown_key_message(key, origin, list(hints)))
    cfg = Config(**{key: _check_type(key, value, hints[key], origin) for key, (value, origin) in values.items()})
    validate_config(cfg, {key: origin for key, (_, origin) in values.items()})
    return cfg


def _parse_override(override: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, the value read as YAML; an empty value is the empty string)."""
    key, separator, text = override.partition("=")
    if not separator or not key.strip():
        raise UserError(f"--opts {override!r} must look like key=value (e.g. lr=1e-4)")
    try:
        return key.strip(), _load_yaml(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise UserError(f"--opts {override}: the value is not valid YAML ({_yaml_problem(error)})") from None


def _unknown_key_message(key: Any, origin: str, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    return f"unknown config key {key!r} in {origin}; {hint}every key, with its default, is in util/config.py (Config)"


def _read_with_base(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, tuple[Any, str]]:
    """Key -> (value, where it came from) of ``path`` and its ``_base_`` chain; a file's own keys win over its
    base's. ``chain``: the files that named ``path`` as their base, nearest last."""
    own = _read_yaml(path)
    chain = (*chain, path)
    values: dict[str, tuple[Any, str]] = {}
    if BASE_KEY in own:
        named = own.pop(BASE_KEY)
        if not isinstance(named, str) or not named:
            raise UserError(f"{path}: {BASE_KEY} must name one file (relative to {path}), got {named!r}")
        base_path = path.parent / named
        if not base_path.is_file():
            raise UserError(f"{path}: its {BASE_KEY} file {base_path} does not exist (the path is relative to {path})")
        seen = [file.resolve() for file in chain]
        if base_path.resolve() in seen:
            cycle = [*chain[seen.index(base_path.resolve()) :], base_path]
            raise UserError(
                f"{path}: its {BASE_KEY} chain comes back to a file of its own ({' -> '.join(map(str, cycle))}); "
                f"remove one of these {BASE_KEY} lines"
            )
        values.update(_read_with_base(base_path, chain))
    values.update({key: (value, str(path)) for key, value in own.items()})
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping stating a key twice is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}  # key -> the line that states it first (1-based)
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" merges by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_lines.get(key)
            except TypeError:  # an unhashable key: the safe loader's own error names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} stated twice (first on line {first}); keep one",
                    problem_mark=key_node.start_mark,
                )
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist (see configs/ for the published ones)")
    try:
        content = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: a config is a mapping of key: value, got {type(content).__name__}")
    return content


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's complaint with its line and column (1-based), without PyYAML's "<unicode string>"."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _check_type(key: str, value: Any, expected: Any, origin: str) -> Any:
    """``value`` as the type ``expected`` of ``key``: ints pass as floats, nothing else is converted."""
    if typing.get_origin(expected) is list:
        return _check_list(key, value, typing.get_args(expected)[0], origin)
    allowed = typing.get_args(expected) or (expected,)
    if isinstance(value, bool) and bool not in allowed:  # bool is an int: do not let true pass as 1
        raise UserError(f"config key {key!r} in {origin} must be {_names(allowed)}, got {value!r}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, allowed):
        raise UserError(f"config key {key!r} in {origin} must be {_names(allowed)}, got {value!r}")
    return value


def _check_list(key: str, value: Any, item_type: type, origin: str) -> list:
    """A list of ``item_type`` (ints pass as floats); YAML ``[1, 2]`` or a single item."""
    items = value if isinstance(value, list) else [value]
    if any(
        isinstance(item, bool) or not isinstance(item, (item_type, int) if item_type is float else item_type)
        for item in items
    ):
        raise UserError(f"config key {key!r} in {origin} must be a list of {item_type.__name__}, got {value!r}")
    return [item_type(item) for item in items]


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(kind.__name__ for kind in types)


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value >= low), f">= {low}"


def _in_range(low: float, high: float, high_included: bool) -> tuple[Callable[[Any], bool], str]:
    if high_included:
        return (lambda value: low <= value <= high), f"in [{low}, {high}]"
    return (lambda value: low <= value < high), f"in [{low}, {high})"


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in choices), f"one of {', '.join(choices)}"


def _sizes() -> tuple[Callable[[Any], bool], str]:
    return (lambda value: len(value) > 0 and all(size >= 1 for size in value)), "a non-empty list of sizes >= 1"


# Valid values, checked when a config is loaded (before a model or data set is built).
# key -> (test of a value, what the test accepts); keys not listed take any value of their type.
VALID_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "position_embedding_scale": (lambda value: value > 0, "> 0"),
    "num_feature_levels": _at_least(1),
    "hidden_dim": _at_least(1),
    "dim_feedforward": _at_least(1),
    "nheads": _at_least(1),
    "enc_layers": _at_least(1),
    "dec_layers": _at_least(1),
    "dropout": _in_range(0, 1, high_included=False),
    "enc_n_points": _at_least(1),
    "dec_n_points": _at_least(1),
    "num_queries": _at_least(1),
    "attention_backend": _one_of("auto", "pytorch", "cpu", "cuda"),
    "num_classes": _at_least(1),
    **{key: _at_least(0) for key in ("set_cost_class", "set_cost_bbox", "set_cost_giou")},
    **{key: _at_least(0) for key in ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef")},
    "focal_alpha": _in_range(0, 1, high_included=True),
    **{key: _at_least(0) for key in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm")},
    "batch_size": _at_least(1),
    "epochs": _at_least(1),
    "lr_drop": _at_least(1),
    "amp": _one_of("none", "bfloat16", "float16", "auto"),
    "inference_dtype": _one_of("auto", "float32", "bfloat16"),
    "train_scales": _sizes(),
    "max_size": _at_least(1),
    "crop_scales": _sizes(),
    "crop_size": (lambda value: len(value) == 2 and 1 <= value[0] <= value[1], "[min, max] with 1 <= min <= max"),
    "val_size": _at_least(1),
    "size_divisibility": _at_least(1),
    "device": (lambda value: re.fullmatch(r"cpu|cuda(:\d+)?", value) is not None, "cpu, cuda or cuda:N"),
    "num_workers": _at_least(0),
    "eval_every": _at_least(0),
    "save_every": _at_least(0),
    "print_every": _at_least(1),
    "dist_timeout_minutes": (lambda value: value > 0, "> 0"),
    "seed": _in_range(0, 2**32 - 1, high_included=True),  # NumPy's range; seed + rank seeds torch and Python too
}


# Keys of float values (lists of floats too), each refused unless finite: YAML reads .inf and .nan, and 1e400 as inf.
FLOAT_KEYS: tuple[str, ...] = tuple(
    key for key, hint in typing.get_type_hints(Config).items() if float in (typing.get_args(hint) or (hint,))
)


def validate_config(cfg: Config, origins: Mapping[str, str] | None = None) -> None:
    """Raise :class:`UserError` for the first value of ``cfg`` that is not finite (``FLOAT_KEYS``) or outside its
    range (``VALID_VALUES``), or keys that disagree, naming the key and where its value came from (``origins``:
    key -> file or ``--opts ...``)."""
    origins = origins or {}

    def where(key: str) -> str:
        return origins.get(key, "the defaults")

    for key in FLOAT_KEYS:
        value = getattr(cfg, key)
        if not all(math.isfinite(item) for item in (value if isinstance(value, list) else [value])):
            raise UserError(f"config key {key!r} in {where(key)} must be a finite number, got {value!r}")
    for key, (is_valid, accepted) in VALID_VALUES.items():
        value = getattr(cfg, key)
        if not is_valid(value):
            raise UserError(f"config key {key!r} in {where(key)} must be {accepted}, got {value!r}")
    if cfg.hidden_dim % cfg.nheads:
        raise UserError(
            f"hidden_dim ({cfg.hidden_dim}, from {where('hidden_dim')}) must be a multiple of nheads "
            f"({cfg.nheads}, from {where('nheads')})"
        )
