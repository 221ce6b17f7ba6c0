"""Hugging Face transformers' Deformable DETR checkpoints to ours and back, offline.

    python main.py convert --from-hf DIR_OR_FILE --out checkpoint.pth     # config.json + model.safetensors
    python main.py convert --to-hf checkpoint.pth --config F --out DIR   # writes config.json + weights

``--from-hf`` reads a folder (or its weights file) of ``DeformableDetrForObjectDetection`` as the hub has it
(``SenseTime/deformable-detr`` and its variants: timm ResNet backbone) or as transformers 5 saves it, finds the
published variant and config (two-stage, box refinement, single scale, DC5), maps every weight onto our state dict
and writes ``{"model", "config", "category_names"}``. It refuses, naming the keys, what it cannot map. The
weights' differences handled here:

- the backbone is timm's ResNet (``model.backbone.conv_encoder.model.*``, the same names as torchvision's) with
  frozen batch norm of eps 1e-5, as ours; transformers' own ResNet backbone (``use_timm_backbone=false``) is
  refused;
- the decoder's query self-attention has separate ``q_proj``, ``k_proj``, ``v_proj`` where ours, an
  ``nn.MultiheadAttention``, stacks them in ``in_proj_weight``;
- the layer norms and feed-forwards have other names (``self_attn_layer_norm``, ``fc1``, ...);
- ``num_labels`` is our ``num_classes`` (91 for the COCO checkpoints), ``two_stage_num_proposals`` our
  ``num_queries`` in the two-stage variant;
- heads shared by all decoder layers (no box refinement), and those the decoder shares with the detector, may be
  saved once: the missing copies are taken from their twin. transformers 5 ties every layer's class head to
  layer 0's (also with box refinement, where the original has one per layer): a file it wrote holds
  ``class_embed.0`` alone, which then serves every layer, as in transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models import PUBLISHED_VARIANTS, Variant, build_model
from models.describe import describe_state_dict
from util.checkpoint import load_checkpoint, load_model_weights
from util.config import Config, load_config
from util.errors import UserError

SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
TIMM_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")

# Our key (regex) -> the hub's key (transformers 4 names, which transformers 5 also loads), one tensor each.
_RULES = [
    (r"backbone\.0\.body\.(.+)", r"model.backbone.conv_encoder.model.\1"),
    (r"input_proj\.(.+)", r"model.input_proj.\1"),
    (r"query_embed\.weight", r"model.query_position_embeddings.weight"),
    (r"transformer\.(level_embed|reference_points\..+|enc_output.*|pos_trans.*)", r"model.\1"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)", r"model.encoder.layers.\1.self_attn.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm1\.(.+)", r"model.encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm2\.(.+)", r"model.encoder.layers.\1.final_layer_norm.\2"),
    (r"transformer\.(en|de)coder\.layers\.(\d+)\.linear(\d)\.(.+)", r"model.\1coder.layers.\2.fc\3.\4"),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.(.+)", r"model.decoder.layers.\1.encoder_attn.\2"),
    (
        r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)",
        r"model.decoder.layers.\1.self_attn.out_proj.\2",
    ),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.(.+)", r"model.decoder.layers.\1.encoder_attn_layer_norm.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(.+)", r"model.decoder.layers.\1.self_attn_layer_norm.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.(.+)", r"model.decoder.layers.\1.final_layer_norm.\2"),
    (r"transformer\.decoder\.((?:class|bbox)_embed\..+)", r"model.decoder.\1"),
    (r"((?:class|bbox)_embed\..+)", r"\1"),
]
# Ours stacks the decoder self-attention's query, key and value projections; the hub keeps three.
_IN_PROJ = re.compile(r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)")
_QKV = ("q_proj", "k_proj", "v_proj")
# transformers 5's own names -> the hub's (its save_pretrained may write either)
_HF5_RENAMES = [
    (re.compile(r"^model\.backbone\.model\."), "model.backbone.conv_encoder.model."),
    (re.compile(r"\.self_attn\.o_proj\."), ".self_attn.out_proj."),
    (re.compile(r"\.layers\.(\d+)\.mlp\.fc(\d)\."), r".layers.\1.fc\2."),
]


def hf_key(key: str) -> str | list[str]:
    """The hub's key of our ``key``: one name, or the three (q, k, v) whose rows ``in_proj_*`` stacks.

    Raises:
        KeyError: a key of ours that has no counterpart (a backbone other than ResNet, say).
    """
    match = _IN_PROJ.fullmatch(key)
    if match:
        layer, kind = match.groups()
        return [f"model.decoder.layers.{layer}.self_attn.{name}.{kind}" for name in _QKV]
    for pattern, replacement in _RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise KeyError(key)


def _twins(key: str, shared_heads: bool) -> list[str]:
    """Hub keys holding the same tensor as ``key`` (transformers saves tied weights once): the detector's and the
    decoder's copy of a head, and layer 0's head for every layer's class head (transformers 5 ties them in every
    variant) and, with ``shared_heads`` (no box refinement), box head."""
    match = re.fullmatch(r"(model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
    if not match:
        return []
    decoder, head, index, rest = match.groups()
    twins = [f"{head}.{index}.{rest}"] if decoder else [f"model.decoder.{head}.{index}.{rest}"]
    if shared_heads or head == "class_embed":
        twins += [f"{prefix}{head}.0.{rest}" for prefix in ("", "model.decoder.")]
    return [twin for twin in twins if twin != key]


def normalise_hf_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub's names for a state dict saved under transformers 4 or 5 names."""
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _HF5_RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = tensor
    return renamed


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the hub's names and layout (contiguous copies, no shared storage)."""
    converted = {}
    for key, tensor in state_dict.items():
        try:
            target = hf_key(key)
        except KeyError:
            raise UserError(
                f"cannot map {key!r} to transformers' Deformable DETR (its backbone is a timm ResNet)"
            ) from None
        if isinstance(target, list):
            for name, part in zip(target, tensor.chunk(3, dim=0)):
                converted[name] = part.clone().contiguous()
        else:
            converted[target] = tensor.clone().contiguous()
    return converted


def from_hf_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    shared_heads: bool,
    source: str = "the checkpoint",
) -> dict[str, torch.Tensor]:
    """The hub's weights as a state dict with ``own``'s keys (our model's ``state_dict()``), shapes checked.

    ``shared_heads``: one class and box head for all decoder layers (no box refinement), so that a head saved
    once serves every layer.

    Raises:
        UserError: naming the keys of ours that have no weight, the hub's keys left unused, and shapes that differ.
    """
    weights = normalise_hf_keys(hf_state_dict)
    weights = {key: value for key, value in weights.items() if not key.endswith("num_batches_tracked")}
    used: set[str] = set()
    converted, missing, wrong_shape = {}, [], []

    def take(name: str) -> torch.Tensor | None:
        for candidate in [name, *_twins(name, shared_heads)]:
            if candidate in weights:
                used.add(candidate)
                return weights[candidate]
        return None

    for key, reference in own.items():
        try:
            target = hf_key(key)
        except KeyError:
            missing.append(key)
            continue
        names = target if isinstance(target, list) else [target]
        parts = [take(name) for name in names]
        if any(part is None for part in parts):
            missing.append(f"{key} (from {', '.join(names)})")
            continue
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        if tuple(tensor.shape) != tuple(reference.shape):
            wrong_shape.append(f"{key} {tuple(tensor.shape)} (ours {tuple(reference.shape)})")
            continue
        converted[key] = tensor.to(reference.dtype)
    unused = sorted(set(weights) - used)
    if missing or unused or wrong_shape:
        problems = [
            f"{len(items)} {label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
            for label, items in (
                ("weights of ours with no counterpart", missing),
                ("weights it has that we cannot map", unused),
                ("shapes that differ", wrong_shape),
            )
            if items
        ]
        raise UserError(f"{source} cannot be converted: " + "; ".join(problems))
    return converted


def _hf_backbone(hf_config: Mapping[str, Any], source: str) -> str:
    backbone_config = hf_config.get("backbone_config") or {}
    timm = hf_config.get("use_timm_backbone", backbone_config.get("model_type", "timm_backbone") == "timm_backbone")
    name = hf_config.get("backbone") or backbone_config.get("backbone") or "resnet50"
    if not timm or name not in TIMM_RESNETS:
        kind = f"timm's {name}" if timm else f"transformers' own {backbone_config.get('model_type', 'backbone')}"
        raise UserError(
            f"{source}: its backbone is {kind}; only timm ResNets ({', '.join(TIMM_RESNETS)}, use_timm_backbone=true, "
            "as the SenseTime checkpoints) map onto ours"
        )
    return name


def config_from_hf(hf_config: Mapping[str, Any], source: str = "config.json") -> tuple[str, list[str]]:
    """transformers' ``DeformableDetrConfig`` (as read from config.json) -> (our config file, overrides).

    Raises:
        UserError: an architecture ours does not have (learned position embedding, another activation, encoder
            and decoder of different widths or heads, a backbone other than a timm ResNet).
    """
    get = hf_config.get
    for key, expected in (("position_embedding_type", "sine"), ("activation_function", "relu")):
        if get(key, expected) != expected:
            raise UserError(f"{source}: {key}={get(key)!r} is not supported (ours: {expected!r})")
    for ours, (encoder, decoder, default) in {
        "dim_feedforward": ("encoder_ffn_dim", "decoder_ffn_dim", 1024),
        "nheads": ("encoder_attention_heads", "decoder_attention_heads", 8),
    }.items():
        if get(encoder, default) != get(decoder, default):
            raise UserError(
                f"{source}: {encoder}={get(encoder)} and {decoder}={get(decoder)} differ; ours has one {ours}"
            )
    two_stage, box_refine = bool(get("two_stage", False)), bool(get("with_box_refine", False))
    levels, dilation = int(get("num_feature_levels", 4)), bool(get("dilation", False))
    num_labels = get("num_labels") or len(get("id2label") or {}) or 91
    values = {
        "backbone": _hf_backbone(hf_config, source),
        "dilation": dilation,
        "num_feature_levels": levels,
        "hidden_dim": get("d_model", 256),
        "dim_feedforward": get("encoder_ffn_dim", 1024),
        "nheads": get("encoder_attention_heads", 8),
        "enc_layers": get("encoder_layers", 6),
        "dec_layers": get("decoder_layers", 6),
        "enc_n_points": get("encoder_n_points", 4),
        "dec_n_points": get("decoder_n_points", 4),
        "num_queries": get("two_stage_num_proposals", 300) if two_stage else get("num_queries", 300),
        "with_box_refine": box_refine,
        "two_stage": two_stage,
        "num_classes": num_labels,
    }
    # the published variant whose config needs the fewest overrides; of those, the one closest to the defaults
    defaults = Config().to_dict()

    def distance(pair: tuple[Variant, Config]) -> tuple[int, int]:
        cfg = pair[1]
        changed = sum(value != defaults[key] for key, value in cfg.to_dict().items())
        return sum(getattr(cfg, key) != value for key, value in values.items()), changed

    variant, base = min(((variant, variant.load_config()) for variant in PUBLISHED_VARIANTS), key=distance)
    overrides = [f"{key}={json.dumps(value)}" for key, value in values.items() if getattr(base, key) != value]
    return str(variant.config_path), overrides


def config_to_hf(cfg: Config, category_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Our config -> transformers' ``DeformableDetrConfig`` fields (config.json), timm ResNet backbone."""
    if cfg.backbone not in TIMM_RESNETS:
        raise UserError(f"backbone={cfg.backbone!r}: transformers' Deformable DETR takes timm ResNets {TIMM_RESNETS}")
    if cfg.two_stage and not cfg.with_box_refine:
        raise UserError("transformers' Deformable DETR requires with_box_refine=true when two_stage=true")
    names = dict(category_names or {})
    id2label = {str(index): str(names.get(index, f"LABEL_{index}")) for index in range(cfg.num_classes)}
    return {
        "architectures": ["DeformableDetrForObjectDetection"],
        "model_type": "deformable_detr",
        "backbone": cfg.backbone,
        "use_timm_backbone": True,
        "use_pretrained_backbone": False,
        "dilation": cfg.dilation,
        "num_feature_levels": cfg.num_feature_levels,
        "d_model": cfg.hidden_dim,
        "encoder_ffn_dim": cfg.dim_feedforward,
        "decoder_ffn_dim": cfg.dim_feedforward,
        "encoder_attention_heads": cfg.nheads,
        "decoder_attention_heads": cfg.nheads,
        "encoder_layers": cfg.enc_layers,
        "decoder_layers": cfg.dec_layers,
        "encoder_n_points": cfg.enc_n_points,
        "decoder_n_points": cfg.dec_n_points,
        "num_queries": cfg.num_queries,
        "two_stage_num_proposals": cfg.num_queries,
        "with_box_refine": cfg.with_box_refine,
        "two_stage": cfg.two_stage,
        "position_embedding_type": "sine",
        "activation_function": "relu",
        "dropout": cfg.dropout,
        "auxiliary_loss": cfg.aux_loss,
        "focal_alpha": cfg.focal_alpha,
        "id2label": id2label,
        "label2id": {name: int(index) for index, name in id2label.items()},
    }


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` (needs the ``safetensors`` package) or ``pytorch_model.bin`` (weights only)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(
                f"{path} is a safetensors file but the safetensors package is not installed: pip install safetensors"
            ) from None
        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds {type(state_dict).__name__}, not a state dict")
    return state_dict


def find_hf_files(path: str | Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a hub folder, or of the folder of a given weights file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        candidates = [folder / name for name in (SAFETENSORS, PYTORCH_BIN) if (folder / name).is_file()]
        if not candidates:
            raise UserError(f"{folder} holds neither {SAFETENSORS} nor {PYTORCH_BIN}; download the model's folder")
        weights = candidates[0]
    elif path.is_file():
        weights = path
    else:
        raise UserError(f"--from-hf {path}: no such file or folder")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{config} is missing: the converter needs the model's config.json beside its weights")
    return config, weights


def convert_from_hf(path: str | Path) -> tuple[dict[str, Any], str, list[str]]:
    """Read a hub folder (or weights file) -> (our checkpoint, config file, overrides) for ``main.py``."""
    config_path, weights_path = find_hf_files(path)
    hf_config = json.loads(config_path.read_text())
    if hf_config.get("model_type", "deformable_detr") != "deformable_detr":
        raise UserError(f"{config_path}: model_type is {hf_config.get('model_type')!r}, not 'deformable_detr'")
    config_file, overrides = config_from_hf(hf_config, str(config_path))
    cfg = load_config(config_file, overrides=[*overrides, "pretrained_backbone=false"])
    model, _, _ = build_model(cfg)
    weights = read_hf_weights(weights_path)
    if not any(key.startswith(("class_embed.", "model.decoder.class_embed.")) for key in weights):
        raise UserError(
            f"{weights_path} has no detection heads (class_embed, bbox_embed): it is a DeformableDetrModel, not a "
            "DeformableDetrForObjectDetection"
        )
    state_dict = from_hf_state_dict(weights, model.state_dict(), not cfg.with_box_refine, str(weights_path))
    names = {int(index): name for index, name in (hf_config.get("id2label") or {}).items()}
    checkpoint = {"model": state_dict, "config": cfg.to_dict(), "category_names": names}
    return checkpoint, config_file, overrides


def convert_to_hf(checkpoint_path: str | Path, cfg: Config, out_dir: str | Path) -> Path:
    """Our checkpoint (built with ``cfg``) -> ``out_dir/config.json`` and ``model.safetensors`` (or
    ``pytorch_model.bin`` without the safetensors package), for ``DeformableDetrForObjectDetection``."""
    if not Path(checkpoint_path).is_file():
        raise UserError(f"--to-hf {checkpoint_path}: no such checkpoint file")
    model, _, _ = build_model(cfg)
    checkpoint = load_checkpoint(checkpoint_path)
    try:  # the config must describe the checkpoint
        load_model_weights(model, checkpoint, checkpoint_path, describe=describe_state_dict)
    except ValueError as error:
        raise UserError(f"{error}; pass the config it was trained with (--config, --opts)") from error
    hf_config = config_to_hf(cfg, checkpoint.get("category_names"))
    weights = to_hf_state_dict(model.state_dict())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(weights, out_dir / PYTORCH_BIN)
        return out_dir / PYTORCH_BIN
    save_file(weights, str(out_dir / SAFETENSORS), metadata={"format": "pt"})
    return out_dir / SAFETENSORS
