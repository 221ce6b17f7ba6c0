"""The Deformable DETR detector: backbone, input projections, deformable transformer, class and box heads."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Joiner, resize_mask
from models.deformable_decoder import DeformableDecoder
from models.deformable_transformer import DeformableTransformer
from util.image_batch import pad_images


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


def project_extra_level(projection: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``projection`` (a stride-2 3x3 convolution and its GroupNorm: an extra level of ``input_proj``) of x
    (B, C, H, W) -> (B, hidden_dim, H', W').

    On the CPU a map of width 1 or 2 is convolved in float32 whatever the autocast or the weights' dtype: there
    oneDNN's bfloat16 3x3 stride-2 convolution returns NaN or wrong values when its output is one column wide and at
    least two rows high (measured under torch 2.9.1, 2.14.1 and 2.15.0; a narrow image's coarsest level, e.g. the
    64-pixel demo's). The output keeps the dtype the projection would have given.
    """
    conv, norm = projection
    half = x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled("cpu")
    if x.device.type != "cpu" or not half or x.shape[-1] > 2:
        return projection(x)
    with torch.autocast("cpu", enabled=False):
        bias = None if conv.bias is None else conv.bias.float()
        y = F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    autocast = torch.is_autocast_enabled("cpu")
    return norm(y.to(torch.get_autocast_dtype("cpu") if autocast else x.dtype))  # the dtype the convolution gives


class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al., 2021), with its box-refinement and two-stage variants.

    Args:
        backbone: multi-scale features with masks and position encodings (``backbone.0`` / ``backbone.1``).
        transformer: encoder and decoder; the variant is the transformer's: box refinement when its decoder
            refines (``decoder.with_box_refine``), two-stage when it is two-stage. Its decoder gets this detector's
            heads in those variants (the original checkpoints list them under both names).
        num_classes: classes of the sigmoid classifier (91 for COCO's category ids).
        num_queries: object queries (two-stage: proposals kept).
        num_feature_levels: levels fed to the transformer; those beyond the backbone's come from stride-2 3x3
            convolutions, the first on the backbone's last output.
        aux_loss: also return every decoder layer's predictions.

    With box refinement each decoder layer has its own heads; otherwise one head pair is shared by all layers.
    Two-stage adds one more head pair, which scores the encoder's proposals.
    """

    def __init__(
        self,
        *,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int = 300,
        num_feature_levels: int = 4,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        with_box_refine, two_stage = transformer.decoder.with_box_refine, transformer.two_stage
        if num_feature_levels != transformer.level_embed.shape[0]:
            raise ValueError(
                f"num_feature_levels ({num_feature_levels}) must equal the transformer's levels "
                f"({transformer.level_embed.shape[0]})"
            )
        self.backbone, self.transformer = backbone, transformer
        self.num_queries, self.num_feature_levels = num_queries, num_feature_levels
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = self._input_projections(backbone.num_channels, hidden_dim, num_feature_levels)
        class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:  # one head per layer, initialised alike
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
        else:  # one head shared by all layers, listed under every index
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if not two_stage:  # the first layer predicts sizes of sigmoid(-2) ~ 0.12; later layers refine them
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        if with_box_refine or two_stage:
            transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            transformer.decoder.class_embed = self.class_embed

    @staticmethod
    def _input_projections(backbone_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
        """1x1 convolution + GroupNorm per backbone level, then stride-2 3x3 convolutions for the extra levels."""
        projections = [
            nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
            for channels in backbone_channels
        ]
        in_channels = backbone_channels[-1]
        for _ in range(num_feature_levels - len(backbone_channels)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim)
                )
            )
            in_channels = hidden_dim
        for projection in projections:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
        return nn.ModuleList(projections)

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        padding_mask: torch.Tensor | None = None,
    ) -> dict:
        """Detect objects.

        Args:
            images: (B, 3, H, W) normalised, or a list of (3, H_i, W_i) padded here into one batch.
            padding_mask: (B, H, W) bool, True on padding; None: no padding (ignored for a list).

        Returns:
            ``pred_logits`` (B, Q, num_classes) before sigmoid; ``pred_boxes`` (B, Q, 4) cx, cy, w, h in [0, 1] of
            the unpadded image; ``aux_outputs`` (with ``aux_loss``) the same two for every decoder layer but the
            last; two-stage: ``enc_outputs`` the same two for every encoder pixel's proposal (class-agnostic
            score in ``pred_logits[..., 0]``). Where the attention (and a DCN backbone) sampled is recorded by
            :func:`ops.record_sampling`.
        """
        if not isinstance(images, torch.Tensor):
            images, padding_mask = pad_images(images)
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W) or a list of (3, H, W), got {tuple(images.shape)}")
        if padding_mask is not None and padding_mask.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(
                f"padding_mask must be (B, H, W) = {(images.shape[0], *images.shape[-2:])}, "
                f"got {tuple(padding_mask.shape)}"
            )
        srcs, masks, positions = self._levels(images, padding_mask)
        query_embed = None if self.two_stage else self.query_embed.weight
        # no padding: no masks at all (the transformer then masks nothing), the encodings from the sizes alone
        transformed = self.transformer(srcs, None if padding_mask is None else masks, positions, query_embed)
        outputs_class, outputs_coord = self._predictions(transformed)
        outputs = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            outputs["aux_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1])
            ]
        if self.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": transformed["enc_outputs_class"],
                "pred_boxes": transformed["enc_outputs_coord_unact"].sigmoid(),
            }
        return outputs

    def _levels(
        self, images: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor]]:
        """-> per level: projected features (B, C, H_l, W_l), masks (B, H_l, W_l) (None without ``padding_mask``),
        position encodings."""
        features, masks, positions = self.backbone(images, padding_mask)
        srcs = [projection(feature) for projection, feature in zip(self.input_proj, features)]
        for level in range(len(features), self.num_feature_levels):
            src = project_extra_level(self.input_proj[level], features[-1] if level == len(features) else srcs[-1])
            mask = None if padding_mask is None else resize_mask(padding_mask, src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            positions.append(self.backbone.position_encoding.of(src, mask))
        return srcs, masks, positions

    def _predictions(self, transformed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoder layer's class logits (D, B, Q, num_classes) and boxes (D, B, Q, 4)."""
        hidden_states = transformed["hidden_states"]
        classes, boxes = [], []
        for level in range(hidden_states.shape[0]):
            reference = transformed["init_reference"] if level == 0 else transformed["inter_references"][level - 1]
            classes.append(self.class_embed[level](hidden_states[level]))
            boxes.append(DeformableDecoder.refine(self.bbox_embed[level](hidden_states[level]), reference))
        return torch.stack(classes), torch.stack(boxes)
