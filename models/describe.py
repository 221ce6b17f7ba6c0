"""What a Deformable DETR state dict is, read from its keys and shapes alone: for error messages that say which
variant a checkpoint holds and which config builds it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from models.variants import PUBLISHED_VARIANTS
from util.config import Config

_RESNET_DEPTHS = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}  # (layer3 blocks, bottleneck)


def _backbone(keys: set[str]) -> str:
    if not any(key.startswith("backbone.0.body.layer3.") for key in keys):
        return "a non-ResNet backbone" if any(key.startswith("backbone.0.") for key in keys) else "no backbone"
    blocks = len({key.split(".")[4] for key in keys if key.startswith("backbone.0.body.layer3.")})
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in keys
    depth = _RESNET_DEPTHS.get((blocks, bottleneck))
    resnet = f"ResNet-{depth}" if depth else f"a ResNet with {blocks} layer3 blocks"
    return resnet + _deformable_stages(keys)


def _deformable_stages(keys: set[str]) -> str:
    """`` with DCN in dcn_stages=[...]`` for a ResNet-DCN backbone (layer2..4 are stages 3..5), else ``""``."""
    layers = {key.split(".")[3] for key in keys if key.startswith("backbone.0.body.") and ".conv_offset." in key}
    return _dcn_suffix([int(layer.removeprefix("layer")) + 1 for layer in layers])


def _dcn_suffix(stages: list[int]) -> str:
    return f" with DCN in dcn_stages={sorted(stages)}" if stages else ""


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A one-line description, e.g. ``"two-stage, box refinement, 4 feature levels, hidden 256, ResNet-50,
    91 classes"``, naming the config of the published variant it matches, if any."""
    keys = set(state_dict)
    two_stage = "transformer.enc_output.weight" in keys
    refine = any(key.startswith("transformer.decoder.bbox_embed.") for key in keys)
    parts = [("two-stage" if two_stage else "one-stage"), ("box refinement" if refine else "no box refinement")]
    level_embed = state_dict.get("transformer.level_embed")
    levels = None
    if level_embed is not None:
        levels = int(level_embed.shape[0])
        parts += [f"{levels} feature level{'s' * (levels > 1)}", f"hidden {int(level_embed.shape[1])}"]
    backbone = _backbone(keys)
    parts.append(backbone)
    if "query_embed.weight" in keys:
        parts.append(f"{int(state_dict['query_embed.weight'].shape[0])} queries")
    class_bias = state_dict.get("class_embed.0.bias")
    if class_bias is not None:
        parts.append(f"{int(class_bias.shape[0])} classes")
    description = ", ".join(parts)
    if level_embed is None or class_bias is None:
        return description
    # What the weights say, as config keys; the dilation of DC5 leaves no trace in them, so both single-scale
    # configs match a single-scale state dict.
    found = {
        "two_stage": two_stage,
        "with_box_refine": refine,
        "num_feature_levels": levels,
        "hidden_dim": int(level_embed.shape[1]),
        "num_classes": int(class_bias.shape[0]),
    }
    configs = [
        f"configs/{variant.config}"
        for variant, cfg in ((variant, variant.load_config()) for variant in PUBLISHED_VARIANTS)
        if _config_backbone(cfg) == backbone and all(getattr(cfg, key) == value for key, value in found.items())
    ]
    return f"{description}: the published variant of {' or '.join(configs)}" if configs else description


def _config_backbone(cfg: Config) -> str:
    """The backbone of ``cfg`` as :func:`_backbone` names one read from weights (``resnet50`` -> ``ResNet-50``)."""
    name = f"ResNet-{cfg.backbone.removeprefix('resnet')}" if cfg.backbone.startswith("resnet") else cfg.backbone
    return name + _dcn_suffix(cfg.dcn_stages)
