"""ResNet backbone with frozen batch norm, its multi-scale outputs and their padding masks.

Module names follow the original checkpoints: the detector's ``backbone`` is a :class:`Joiner` whose ``0`` is a
:class:`Backbone` (``backbone.0.body.layer1...``) and whose ``1`` is the position encoding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from models.position_encoding import PositionEmbeddingSine, build_position_encoding
from ops.deform_conv import DeformConv2d
from util.config import Config
from util.errors import UserError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
TRAINABLE_STAGES = ("layer2", "layer3", "layer4")  # the stem and layer1 stay frozen, as in the original


class ResNetBody(nn.Module):
    """A torchvision ResNet without its pooling and classifier, returning the outputs of some stages.

    Args:
        resnet: a torchvision ResNet; its ``conv1 ... layer4`` become this module's children (checkpoint names).
        return_layers: the stages whose outputs are returned, in order, e.g. ``("layer2", "layer3", "layer4")``.
    """

    STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, resnet: torchvision.models.ResNet, return_layers: tuple[str, ...]) -> None:
        super().__init__()
        for name in self.STAGES:
            self.add_module(name, getattr(resnet, name))
        self.return_layers = return_layers

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        features = images
        for name in self.STAGES:
            features = getattr(self, name)(features)
            if name in self.return_layers:
                outputs.append(features)
        return outputs


class TimmBody(nn.Module):
    """A timm model built with ``features_only=True``, returning some of its feature maps.

    Args:
        model: the timm feature extractor (its batch norms frozen).
        indices: which of its outputs to return, finest first.
    """

    def __init__(self, model: nn.Module, indices: list[int]) -> None:
        super().__init__()
        self.model, self.indices = model, indices

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.model(images)
        return [features[index] for index in self.indices]


class Backbone(nn.Module):
    """The backbone body and its per-level padding masks.

    Args:
        body: images (B, 3, H, W) -> list of feature maps, finest first.
        strides: each output's stride in pixels.
        num_channels: each output's channels.
    """

    def __init__(self, *, body: nn.Module, strides: list[int], num_channels: list[int]) -> None:
        super().__init__()
        self.body, self.strides, self.num_channels = body, strides, num_channels
        self.input_dtype: torch.dtype | None = None  # None: the images' own
        self.input_memory_format = torch.preserve_format

    def set_input_format(self, dtype: torch.dtype | None, channels_last: bool) -> None:
        """Cast the images to ``dtype`` (None: leave them) and, with ``channels_last``, store them channels-last
        on entry: set by ``models.inference.prepare_for_inference`` for a body converted so."""
        self.input_dtype = dtype
        self.input_memory_format = torch.channels_last if channels_last else torch.preserve_format

    def forward(
        self, images: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """images (B, 3, H, W), padding_mask (B, H, W) or None (no padding) -> per level (features
        (B, C_l, H_l, W_l), mask (B, H_l, W_l) or None)."""
        images = images.to(dtype=self.input_dtype or images.dtype, memory_format=self.input_memory_format)
        return [
            (features, None if padding_mask is None else resize_mask(padding_mask, features.shape[-2:]))
            for features in self.body(images)
        ]


class Joiner(nn.Sequential):
    """The backbone (``0``) and the position encoding (``1``), under the original checkpoint names."""

    def __init__(self, *, backbone: Backbone, position_encoding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_encoding)
        self.strides, self.num_channels = backbone.strides, backbone.num_channels

    @property
    def position_encoding(self) -> PositionEmbeddingSine:
        return self[1]

    def forward(
        self, images: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor]]:
        """-> per level: features (B, C_l, H_l, W_l), masks (B, H_l, W_l) bool (None without ``padding_mask``),
        positions (B, hidden_dim, H_l, W_l)."""
        levels = self[0](images, padding_mask)
        features = [feature for feature, _ in levels]
        masks = [mask for _, mask in levels]
        positions = [self.position_encoding.of(feature, mask) for feature, mask in levels]
        return features, masks, positions


def resize_mask(padding_mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, H, W) bool -> (B, *size) bool, nearest neighbour (as the original)."""
    return F.interpolate(padding_mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def _load_resnet(
    name: str, dilation: bool, pretrained: bool | str, from_scratch: bool = False
) -> torchvision.models.ResNet:
    """A torchvision ResNet with FrozenBatchNorm2d (BatchNorm2d ``from_scratch``), random or with ImageNet weights
    (downloaded or a local file)."""
    if dilation and name in ("resnet18", "resnet34"):
        raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50, resnet101), got {name!r}")
    builder = getattr(torchvision.models, name)
    resnet = builder(
        weights=None,
        replace_stride_with_dilation=[False, False, dilation],
        norm_layer=nn.BatchNorm2d if from_scratch else FrozenBatchNorm2d,
    )
    if pretrained is True:
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1  # the weights the original trained from
        try:
            state_dict = weights.get_state_dict(progress=False)
        except Exception as error:  # no internet, proxy, certificate: all leave us without weights
            raise RuntimeError(
                f"pretrained_backbone=true could not download the ImageNet weights of {name} ({error}). "
                f"Offline, set pretrained_backbone to a local file of torchvision's {name} weights "
                f"(pretrained_backbone=/path/to/{name}.pth), or pretrained_backbone=false to start from random "
                f"weights."
            ) from error
        resnet.load_state_dict(state_dict)
    elif isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_backbone={pretrained!r}: no such file")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
        missing, unexpected = resnet.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if not key.startswith("fc.")]  # the classifier is not used
        if missing or unexpected:
            raise ValueError(
                f"pretrained_backbone={pretrained!r} is not a torchvision {name} state dict: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return resnet


DCN_STAGES = {3: "layer2", 4: "layer3", 5: "layer4"}  # conv3_x .. conv5_x of the papers


def make_deformable(resnet: torchvision.models.ResNet, stages: list[int], modulated: bool) -> list[str]:
    """Replace every 3x3 convolution of the ResNet ``stages`` (3, 4, 5) by an :class:`ops.DeformConv2d` holding
    its weights, in place; returns the replaced modules' names (e.g. ``layer4.2.conv2``), in order.

    The offset (and mask) predictors start at zero: with v1 the network computes exactly what it did before.
    """
    unknown = sorted(set(stages) - set(DCN_STAGES))
    if unknown:
        raise UserError(f"dcn_stages {unknown} are not ResNet stages that can be deformable: use some of 3, 4, 5")
    replaced = []
    for stage in sorted(set(stages)):
        layer = getattr(resnet, DCN_STAGES[stage])
        for block_name, block in layer.named_children():
            for conv_name, conv in list(block.named_children()):
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    setattr(block, conv_name, DeformConv2d.from_conv(conv, modulated=modulated))
                    replaced.append(f"{DCN_STAGES[stage]}.{block_name}.{conv_name}")
    return replaced


def _timm_backbone(cfg: Config) -> Backbone:
    """Any timm model with a ``features_only`` mode: its stride 8, 16, 32 outputs (or stride 32 alone), batch norms
    frozen, every other parameter trained when ``cfg.lr_backbone`` > 0."""
    import timm

    if not timm.is_model(cfg.backbone):
        raise UserError(
            f"backbone {cfg.backbone!r} is neither one of {', '.join(RESNETS)} nor a timm model name: set backbone "
            "to one of them (e.g. --opts backbone=resnet50) or to a name timm.list_models() lists"
        )
    if cfg.dilation:
        raise ValueError(f"dilation (DC5) is supported for the torchvision ResNets {RESNETS}, not {cfg.backbone!r}")
    pretrained = cfg.pretrained_backbone
    overlay = {"file": str(pretrained)} if isinstance(pretrained, str) else None
    if isinstance(pretrained, str) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained_backbone={pretrained!r}: no such file")
    try:
        model = timm.create_model(
            cfg.backbone, pretrained=pretrained is not False, features_only=True, pretrained_cfg_overlay=overlay
        )
    except (OSError, RuntimeError) as error:
        if pretrained is not True:
            raise
        raise RuntimeError(
            f"pretrained_backbone=true could not download the weights of timm's {cfg.backbone} ({error}). Offline, "
            f"set pretrained_backbone to a local weights file, or pretrained_backbone=false."
        ) from error
    if not cfg.backbone_from_scratch:
        model = timm.layers.freeze_batch_norm_2d(model)
    reductions, channels = model.feature_info.reduction(), model.feature_info.channels()
    wanted = [8, 16, 32] if cfg.num_feature_levels > 1 else [32]
    if any(stride not in reductions for stride in wanted):
        raise ValueError(f"timm backbone {cfg.backbone!r} has outputs at strides {reductions}, needs {wanted}")
    indices = [len(reductions) - 1 - reductions[::-1].index(stride) for stride in wanted]  # the deepest of each
    for parameter in model.parameters():
        parameter.requires_grad_(cfg.lr_backbone > 0)
    return Backbone(body=TimmBody(model, indices), strides=wanted, num_channels=[channels[i] for i in indices])


def build_backbone(cfg: Config) -> Joiner:
    """The backbone ``cfg.backbone`` with the position encoding.

    A torchvision ResNet (``resnet18/34/50/101``, the original's; checkpoint-compatible for resnet50) returns C3,
    C4, C5 (``num_feature_levels`` > 1) or C5 alone, with DC5 if ``cfg.dilation``; its stem and layer1 always
    frozen, the rest trained when ``cfg.lr_backbone`` > 0; with ``cfg.backbone_from_scratch``, trainable BatchNorm
    and every stage trained (for random weights); ``cfg.dcn_stages`` makes those stages' 3x3 convolutions
    deformable (:func:`make_deformable`). Any other name is taken from timm (see
    :func:`_timm_backbone`).
    """
    if cfg.backbone_from_scratch and cfg.pretrained_backbone is not False:
        raise ValueError(
            "backbone_from_scratch=true trains the backbone's normalisation and stem from random "
            f"weights: it needs pretrained_backbone=false, got {cfg.pretrained_backbone!r}"
        )
    if cfg.backbone not in RESNETS:
        if cfg.dcn_stages:
            raise UserError(
                f"dcn_stages needs a torchvision ResNet backbone ({', '.join(RESNETS)}), got {cfg.backbone!r}"
            )
        return Joiner(backbone=_timm_backbone(cfg), position_encoding=build_position_encoding(cfg))
    resnet = _load_resnet(cfg.backbone, cfg.dilation, cfg.pretrained_backbone, cfg.backbone_from_scratch)
    make_deformable(resnet, cfg.dcn_stages, cfg.dcn_modulated)  # after the pretrained weights are in
    last_stride = 16 if cfg.dilation else 32
    expansion = 4 if cfg.backbone in ("resnet50", "resnet101") else 1
    if cfg.num_feature_levels > 1:
        return_layers = ("layer2", "layer3", "layer4")
        strides = [8, 16, last_stride]
        num_channels = [128 * expansion, 256 * expansion, 512 * expansion]
    else:
        return_layers, strides, num_channels = ("layer4",), [last_stride], [512 * expansion]
    body = ResNetBody(resnet, return_layers)
    for name, parameter in body.named_parameters():
        trainable = cfg.lr_backbone > 0 and (cfg.backbone_from_scratch or name.split(".")[0] in TRAINABLE_STAGES)
        parameter.requires_grad_(trainable)
    backbone = Backbone(body=body, strides=strides, num_channels=num_channels)
    return Joiner(backbone=backbone, position_encoding=build_position_encoding(cfg))
