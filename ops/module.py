"""``MSDeformAttn``: the multi-scale deformable attention module of Deformable DETR (Zhu et al., eq. 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ops import fused
from ops.functional import BACKENDS, ms_deform_attn, ms_deform_attn_projected, projected_runs
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
        # sampling_offsets and attention_weights as one matrix (merge_query_projections); not in the state dict
        self.register_buffer("query_weight", None, persistent=False)
        self.register_buffer("query_bias", None, persistent=False)
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
        sampled = self.sample(
            query,
            reference_points,
            input_flatten,
            input_spatial_shapes,
            input_level_start_index,
            input_padding_mask,
            level_shapes,
        )
        return self.output_proj(sampled)

    def sample(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` without the output projection (same arguments): the weighted samples of every head,
        (N, Lq, M * D) in the value's dtype (float32 at least under autocast)."""
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
            # in place: the projection's own output; skipped when nothing is padded where that costs no sync or
            # data-dependent branch (the CPU, not tracing)
            cpu_inference = value.device.type == "cpu" and fused.inference_only(value)
            if not cpu_inference or input_padding_mask.any():
                value = value.masked_fill_(input_padding_mask[..., None], 0.0)
        value = value.view(batch, positions, heads, self.d_model // heads)
        if self._samples_in_the_kernel(value, query, reference_points):
            projected = fused.linear(query, self.query_weight, self.query_bias)
            return ms_deform_attn_projected(
                value, input_spatial_shapes, input_level_start_index, reference_points, projected
            )
        offsets, logits = self.project_query(query)
        # Locations in float32 at least: a bfloat16 coordinate in [0, 1] resolves only 1/256 of the map. The weights
        # too: the op runs in its inputs' common dtype.
        dtype = torch.promote_types(offsets.dtype, torch.float32)
        attention_weights = logits.softmax(-1, dtype=dtype).view(batch, queries, heads, levels, points)
        sampling_locations = self.sampling_locations(offsets, reference_points, input_spatial_shapes)
        sampling_locations = sampling_locations.view(batch, queries, heads, levels, points, 2)
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
        return ms_deform_attn(
            value,
            input_spatial_shapes,
            input_level_start_index,
            sampling_locations,
            attention_weights,
            backend=self.backend,
            level_shapes=level_shapes,
        )

    def _samples_in_the_kernel(self, value: torch.Tensor, query: torch.Tensor, reference_points: torch.Tensor) -> bool:
        """Whether :meth:`sample` leaves the locations and weights to the cpu kernel
        (:func:`ops.functional.ms_deform_attn_projected`): merged query projections (inference), 2-d reference
        points, nothing recording the sampling, and :func:`ops.functional.projected_runs`."""
        return (
            self.query_weight is not None
            and self.sampling_recorder is None
            and reference_points.shape[-1] == 2
            and projected_runs(value, query, reference_points, backend=self.backend)
        )

    def project_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (N, Lq, C) -> sampling offsets (N, Lq, M, L * P * 2) in pixels of each level (x, y last) and
        attention logits (N, Lq, M, L * P): one matrix product once :meth:`merge_query_projections` has run."""
        if self.query_weight is None:
            offsets, logits = self.sampling_offsets(query), self.attention_weights(query)
        else:
            projected = fused.linear(query, self.query_weight, self.query_bias)
            sizes = [self.sampling_offsets.out_features, self.attention_weights.out_features]
            offsets, logits = projected.split(sizes, -1)
        return offsets.unflatten(-1, (self.n_heads, -1)), logits.unflatten(-1, (self.n_heads, -1))

    def merge_query_projections(self) -> None:
        """Concatenate the weights of ``sampling_offsets`` and ``attention_weights`` (both read the query) into one
        matrix, used by :meth:`project_query` from now on: for inference (``models.inference``). The merged copy is
        kept outside the state dict, whose keys stay the original's, and does not follow later changes of the two
        linears."""
        with torch.no_grad():
            self.query_weight = torch.cat([self.sampling_offsets.weight, self.attention_weights.weight])
            self.query_bias = torch.cat([self.sampling_offsets.bias, self.attention_weights.bias])

    def sampling_locations(
        self, offsets: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """Where each point samples, (x, y) in [0, 1] of its padded level (eq. 3 of the paper).

        Args:
            offsets: (N, Lq, M, L * P * 2) from :meth:`project_query`.
            reference_points: (N, Lq, L, 2) points, the offsets then in pixels of each level, or (N, Lq, L, 4)
                boxes (cx, cy, w, h), the offsets then in units of the box size * 0.5 / P.
            spatial_shapes: (L, 2) rows (H, W).

        Returns:
            (N, Lq, M, L * P * 2) in float32 at least: reference + offsets * scale, each factor laid out along the
            last dimension (the broadcast then runs in contiguous rows of L * P * 2), computed in place in the
            offsets cast to float32 when no gradient is recorded (half the time of a new tensor at 800 x 1333).
        """
        corner, points = reference_points.shape[-1], self.n_points
        dtype = torch.promote_types(offsets.dtype, torch.float32)
        reference_points = reference_points.to(dtype)

        def per_point(per_level: torch.Tensor) -> torch.Tensor:  # (..., L, 2) -> (..., 1, L * P * 2)
            expanded = per_level.unsqueeze(-2).expand(*per_level.shape[:-1], points, 2)
            return expanded.flatten(-3).unsqueeze(-2)

        if corner == 2:
            scale = per_point(1 / spatial_shapes.flip(-1).to(dtype)).squeeze(0)  # offsets are pixels: / (W, H)
        elif corner == 4:
            scale = per_point(reference_points[..., 2:] * (0.5 / points))
        else:
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {corner}")
        centre = per_point(reference_points[..., :2])
        if not fused.inference_only(offsets, reference_points):
            return torch.addcmul(centre, offsets, scale)
        located = offsets.to(dtype, memory_format=torch.contiguous_format, copy=True)
        return torch.addcmul(centre, located, scale, out=located)
