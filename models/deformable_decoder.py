"""The Deformable DETR decoder: query self-attention, deformable cross-attention to the encoder memory, feed-forward;
optionally refining each query's box layer by layer (iterative bounding-box refinement)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from models.deformable_encoder import feed_forward, with_position
from models.dropout import Dropout
from ops import MSDeformAttn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries (norm2), deformable cross-attention (norm1), feed-forward (norm3), post-norm.

    Sub-module names (``self_attn``, ``cross_attn``, ``norm1..3``, ``linear1``, ``linear2``) are the original
    checkpoints'; ``self_attn`` is an ``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj``).
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
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=attention_backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = nn.ReLU()
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """tgt, query_pos (N, Q, C); reference_points (N, Q, L, 2 or 4) on the padded levels; memory (N, S, C)
        -> (N, Q, C)."""
        query = key = with_position(tgt, query_pos)
        attended = self.self_attn(query, key, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            with_position(tgt, query_pos),
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
            level_shapes=level_shapes,
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(tgt + self.dropout4(feed_forward(self, tgt, self.dropout3)))


class DeformableDecoder(nn.Module):
    """``num_layers`` copies of ``layer``, returning every layer's output and reference points.

    With ``with_box_refine``, layer i's box head (``bbox_embed[i]``, attached by the detector, shared with it)
    turns its output into a correction of the reference boxes that layer i + 1 uses, detached between layers.
    ``class_embed`` and ``bbox_embed`` are also where the two-stage transformer finds its encoder heads
    (index ``num_layers``); both are None until the detector attaches them.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, with_box_refine: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.with_box_refine = with_box_refine
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        query_pos: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the queries.

        Args:
            tgt, query_pos: (N, Q, C) query content and position.
            reference_points: (N, Q, 2) points or (N, Q, 4) boxes (cx, cy, w, h), in [0, 1] of the unpadded image.
            memory: (N, S, C); spatial_shapes (L, 2); level_start_index (L,); valid_ratios (N, L, 2);
            memory_padding_mask: (N, S) bool or None.
            level_shapes: ``spatial_shapes`` as Python ints (see :func:`ops.ms_deform_attn`), or None.

        Returns:
            hidden states (num_layers, N, Q, C); reference points (num_layers, N, Q, 2 or 4), those after each
            layer (its input when boxes are not refined). (Layer i's ``cross_attn`` takes its reference on each
            padded level, (N, Q, L, 2 or 4); :func:`ops.record_sampling` records it with its sampling locations.)
        """
        if self.with_box_refine and self.bbox_embed is None:
            raise RuntimeError("with_box_refine needs the detector's box heads in decoder.bbox_embed")
        output = tgt
        hidden_states, references = [], []
        for index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                reference_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                reference_input = reference_points[:, :, None] * valid_ratios[:, None]
            output = layer(
                output,
                query_pos,
                reference_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                level_shapes,
            )
            if self.with_box_refine:
                reference_points = self.refine(self.bbox_embed[index](output), reference_points).detach()
            hidden_states.append(output)
            references.append(reference_points)
        return torch.stack(hidden_states), torch.stack(references)

    @staticmethod
    def refine(delta: torch.Tensor, reference_points: torch.Tensor) -> torch.Tensor:
        """A box head's output (..., 4), added in logit space to the reference points (..., 2) or boxes (..., 4)
        -> refined boxes (..., 4) in [0, 1]."""
        if reference_points.shape[-1] == 4:
            return (delta + inverse_sigmoid(reference_points)).sigmoid()
        centre = delta[..., :2] + inverse_sigmoid(reference_points)
        return torch.cat([centre, delta[..., 2:]], -1).sigmoid()
