"""The Deformable DETR encoder: multi-scale deformable self-attention over all levels, then a feed-forward."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from models.dropout import Dropout
from ops import MSDeformAttn


def with_position(tensor: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
    return tensor if position is None else tensor + position


def feed_forward(layer: nn.Module, tensor: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """linear2(dropout(activation(linear1(x)))) of ``layer``: the feed-forward of every encoder and decoder layer,
    before its residual; the activation a ReLU (``models.inference`` fuses it into ``linear1``).

    (The linears sit directly under each layer in the original checkpoints, hence a function, not a module.)
    """
    return layer.linear2(dropout(layer.activation(layer.linear1(tensor))))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels (norm1), then a feed-forward (norm2), both post-norm.

    Sub-module names (``self_attn``, ``norm1``, ``linear1``, ``linear2``, ``norm2``) are the original checkpoints'.
    """

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        attention_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=attention_backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = nn.ReLU()
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """src, pos (N, S, C); reference_points (N, S, L, 2) in [0, 1] of each padded level -> (N, S, C)."""
        attended = self.self_attn(
            with_position(src, pos),
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
            level_shapes=level_shapes,
        )
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout3(feed_forward(self, src, self.dropout2)))


class DeformableEncoder(nn.Module):
    """``num_layers`` copies of ``layer``; each query pixel's reference point is its own centre on every level."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(
        spatial_shapes: torch.Tensor,
        valid_ratios: torch.Tensor,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Pixel centres of every level, as (x, y) in [0, 1] of each padded level.

        Args:
            spatial_shapes: (L, 2) int64 rows (H, W).
            valid_ratios: (N, L, 2) the unpadded share (x, y) of each level.
            level_shapes: ``spatial_shapes`` as Python ints (see :func:`ops.ms_deform_attn`), or None.

        Returns:
            (N, S, L, 2): pixel (i, j) of level l, normalised to the unpadded part of level l, then placed on every
            level's padded map (so that it is the same point of the image on each level).
        """
        per_level = []
        for level, (height, width) in enumerate(spatial_shapes.tolist() if level_shapes is None else level_shapes):
            centre_y, centre_x = torch.meshgrid(
                torch.arange(height, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                torch.arange(width, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                indexing="ij",
            )
            ref_y = centre_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = centre_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(per_level, 1)  # (N, S, 2) in [0, 1] of the unpadded image
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        pos: torch.Tensor,
        padding_mask: torch.Tensor | None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Encode the flattened levels.

        Args:
            src, pos: (N, S, C) features and position (+ level) embeddings.
            spatial_shapes: (L, 2); level_start_index: (L,); valid_ratios: (N, L, 2); padding_mask: (N, S) or None.
            level_shapes: ``spatial_shapes`` as Python ints (see :func:`ops.ms_deform_attn`), or None.

        Returns:
            memory (N, S, C). (Each layer's ``self_attn`` takes :meth:`reference_points` on the padded levels,
            (N, S, L, 2); :func:`ops.record_sampling` records them with its sampling locations.)
        """
        reference_points = self.reference_points(spatial_shapes, valid_ratios, level_shapes)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask, level_shapes)
        return output
