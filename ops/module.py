"""``MSDeformAttn``: the multi-scale deformable attention module of Deformable DETR (Zhu et al., eq. 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ops.functional import BACKENDS, ms_deform_attn
from ops.sampling_record import AttentionSampling, RecordsSampling


class MSDeformAttn(RecordsSampling, nn.Module):
    """Each query attends to ``n_points`` learned sampling points per head and level around its reference point.

    Sub-module names (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``) are those of
    the original implementation's checkpoints. Where it samples is recorded by :func:`ops.record_sampling`.

    Args:
        d_model: channels C of queries and values; divisible by ``n_heads``.
        n_levels: feature levels L.
        n_heads: attention heads M.
        n_points: sampling points P per head and level.
        backend: implementation of the sampling, see :func:`ops.ms_deform_attn`.
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, backend: str = "auto"
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initial sampling pattern: head h looks in direction 2*pi*h/M, point i at distance i+1 (in pixels
        of each level, the ring scaled so that its largest coordinate is 1); uniform attention; Xavier projections.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values  # (M, 2) on the unit square
        radii = torch.arange(1, self.n_points + 1, dtype=torch.float64)
        offsets = directions[:, None, None, :] * radii[None, None, :, None]  # (M, 1, P, 2)
        offsets = offsets.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.reshape(-1).to(self.sampling_offsets.bias.dtype))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Attend from each query to its sampling points.

        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) points (x, y) in [0, 1] of the padded map, or (N, Lq, L, 4) boxes
                (cx, cy, w, h): offsets are then scaled by the box size * 0.5 / n_points.
            input_flatten: (N, S, C), the L levels flattened one after another.
            input_spatial_shapes: (L, 2) int64 rows (H, W).
            input_level_start_index: (L,) int64.
            input_padding_mask: (N, S) bool, True on padding (those values are zeroed), or None.
            level_shapes: ``input_spatial_shapes`` as Python ints, see :func:`ops.ms_deform_attn`.

        Returns:
            (N, Lq, C). Within :func:`ops.record_sampling` it also records an :class:`ops.AttentionSampling`:
            sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1] of each padded level and
            attention_weights (N, Lq, M, L, P), summing to 1 over levels and points.
        """
        batch, queries, _ = query.shape
        positions = input_flatten.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if reference_points.dim() != 4 or reference_points.shape[:3] != (batch, queries, levels):
            raise ValueError(
                f"reference_points must be (N, Lq, L, 2 or 4) = ({batch}, {queries}, {levels}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if input_padding_mask.shape != (batch, positions):
                raise ValueError(
                    f"input_padding_mask must be (N, S) = ({batch}, {positions}), got {tuple(input_padding_mask.shape)}"
                )
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, positions, heads, self.d_model // heads)
        # Locations in float32 at least: a bfloat16 coordinate in [0, 1] resolves only 1/256 of the map.
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))
        attention_weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        attention_weights = attention_weights.softmax(-1).view(batch, queries, heads, levels, points)
        reference = reference_points[:, :, None, :, None, :]  # (N, Lq, 1, L, 1, 2 or 4)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W, H)
            level_sizes = input_spatial_shapes.flip(-1).to(offsets.dtype)[None, None, None, :, None, :]
            sampling_locations = reference + offsets / level_sizes
        elif reference_points.shape[-1] == 4:
            sampling_locations = reference[..., :2] + offsets / points * reference[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {reference_points.shape[-1]}")
        if self.sampling_recorder is not None:
            self.sampling_recorder(
                AttentionSampling(
                    sampling_locations,
                    attention_weights,
                    reference_points,
                    input_spatial_shapes,
                    input_level_start_index,
                    input_padding_mask,
                )
            )
        output = ms_deform_attn(
            value,
            input_spatial_shapes,
            input_level_start_index,
            sampling_locations,
            attention_weights,
            backend=self.backend,
            level_shapes=level_shapes,
        )
        return self.output_proj(output)
