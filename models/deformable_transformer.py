"""The deformable transformer: flattens the levels, encodes them, picks the queries (learned, or the encoder's
top-k proposals in the two-stage variant) and decodes them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.deformable_decoder import DeformableDecoder, DeformableDecoderLayer
from models.deformable_encoder import DeformableEncoder, DeformableEncoderLayer
from models.position_encoding import sine_embedding
from ops import MSDeformAttn
from util.config import Config


class DeformableTransformer(nn.Module):
    """Encoder and decoder over multi-scale feature maps.

    Args:
        encoder, decoder: built encoder and decoder.
        d_model: channels C.
        num_feature_levels: levels L.
        two_stage: queries from the encoder's top-``two_stage_num_proposals`` proposals instead of learned ones;
            the detector attaches the encoder heads as ``decoder.class_embed[-1]`` and ``decoder.bbox_embed[-1]``.
        two_stage_num_proposals: queries in the two-stage variant (fewer when the maps have fewer pixels).
    """

    def __init__(
        self,
        *,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        d_model: int = 256,
        num_feature_levels: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.d_model, self.two_stage, self.two_stage_num_proposals = d_model, two_stage, two_stage_num_proposals
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: list[torch.Tensor],
        masks: list[torch.Tensor] | None,
        pos_embeds: list[torch.Tensor],
        query_embed: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run encoder and decoder.

        Args:
            srcs, pos_embeds: per level (N, C, H_l, W_l).
            masks: per level (N, H_l, W_l) bool, True on padding; None: no padding (the attention then masks
                nothing, every valid ratio is 1).
            query_embed: (Q, 2C) learned query position and content; None in the two-stage variant.

        Returns:
            ``hidden_states`` (D, N, Q, C) every decoder layer's output; ``init_reference`` (N, Q, 2 or 4) and
            ``inter_references`` (D, N, Q, 2 or 4), in [0, 1] of the unpadded image; two-stage also
            ``enc_outputs_class`` (N, S, num_classes) and ``enc_outputs_coord_unact`` (N, S, 4) before sigmoid.
            Where each attention layer sampled is recorded by :func:`ops.record_sampling`.
        """
        src_flatten, mask_flatten, pos_flatten, spatial_shapes = self.flatten_levels(srcs, masks, pos_embeds)
        # the sizes as ints too: symbolic when exported, so that the graph takes any image size
        level_shapes = [(src.shape[-2], src.shape[-1]) for src in srcs]
        areas = spatial_shapes.prod(1)
        level_start_index = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
        if masks is None:
            valid_ratios = src_flatten.new_ones(src_flatten.shape[0], len(srcs), 2, dtype=torch.float32)
        else:
            valid_ratios = torch.stack([valid_ratio(mask) for mask in masks], 1)
        memory = self.encoder(
            src_flatten, spatial_shapes, level_start_index, valid_ratios, pos_flatten, mask_flatten, level_shapes
        )
        outputs: dict[str, torch.Tensor] = {}
        if self.two_stage:
            query_pos, tgt, reference_points = self.two_stage_queries(memory, mask_flatten, level_shapes, outputs)
        else:
            if query_embed is None:
                raise ValueError("query_embed (Q, 2C) is required unless two_stage")
            query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(memory.shape[0], -1, -1)
            tgt = tgt.unsqueeze(0).expand(memory.shape[0], -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        hidden_states, inter_references = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            mask_flatten,
            level_shapes,
        )
        outputs.update(hidden_states=hidden_states, init_reference=reference_points, inter_references=inter_references)
        return outputs

    def flatten_levels(
        self, srcs: list[torch.Tensor], masks: list[torch.Tensor] | None, pos_embeds: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Per-level maps -> src (N, S, C), mask (N, S) or None (no masks), pos + level embedding (N, S, C),
        spatial_shapes (L, 2)."""
        masks = masks if masks is not None else [None] * len(srcs)
        if not len(srcs) == len(masks) == len(pos_embeds) == self.level_embed.shape[0]:
            raise ValueError(
                f"srcs, masks and pos_embeds must each hold {self.level_embed.shape[0]} levels, "
                f"got {len(srcs)}, {len(masks)} and {len(pos_embeds)}"
            )
        spatial_shapes = torch.stack(
            [  # built from the (possibly symbolic) sizes: as_tensor would freeze them in an exported graph
                torch.stack([torch.scalar_tensor(size, dtype=torch.long, device=src.device) for size in src.shape[-2:]])
                for src in srcs
            ]
        )
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = None if masks[0] is None else torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flatten = torch.cat(
            [
                pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                for level, pos in enumerate(pos_embeds)
            ],
            1,
        )
        return src_flatten, mask_flatten, pos_flatten, spatial_shapes

    def two_stage_queries(
        self,
        memory: torch.Tensor,
        mask_flatten: torch.Tensor | None,
        level_shapes: Sequence[tuple[int, int]],
        outputs: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score one proposal per encoder pixel, keep the top k as the decoder's queries and reference boxes.

        Puts ``enc_outputs_class`` (N, S, num_classes) and ``enc_outputs_coord_unact`` (N, S, 4) in ``outputs``
        and returns query_pos, tgt (N, k, C) and reference boxes (N, k, 4) in [0, 1], detached.
        """
        if self.decoder.class_embed is None or self.decoder.bbox_embed is None:
            raise RuntimeError("two_stage needs the detector's heads in decoder.class_embed and decoder.bbox_embed")
        output_memory, output_proposals = encoder_proposals(memory, mask_flatten, level_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
        enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
        outputs.update(enc_outputs_class=enc_outputs_class, enc_outputs_coord_unact=enc_outputs_coord_unact)
        # Padding never becomes a query (the original can pick it when its constant score is high enough).
        scores = enc_outputs_class[..., 0]
        if mask_flatten is not None:
            scores = scores.masked_fill(mask_flatten, float("-inf"))
        # sym_min: no guard on S in a torch.export graph; the tracing exporter sees S as a tensor and needs min
        pick_min = min if torch.jit.is_tracing() else torch.sym_min
        topk = pick_min(self.two_stage_num_proposals, scores.shape[1])
        topk_indices = torch.topk(scores, topk, dim=1)[1]
        topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_indices[..., None].expand(-1, -1, 4))
        topk_coords_unact = topk_coords_unact.detach()
        position = sine_embedding(topk_coords_unact.sigmoid() * (2 * math.pi), self.d_model // 2)
        position = position.to(self.pos_trans.weight.dtype)  # a bfloat16 model (models.inference) takes bfloat16
        query_pos, tgt = torch.split(self.pos_trans_norm(self.pos_trans(position)), self.d_model, dim=2)
        return query_pos, tgt, topk_coords_unact.sigmoid()


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool padding mask -> (N, 2) the unpadded share (x, y) of the map."""
    _, height, width = mask.shape
    valid_height = (~mask[:, :, 0]).sum(1)
    valid_width = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)


def encoder_proposals(
    memory: torch.Tensor, mask_flatten: torch.Tensor | None, level_shapes: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal per encoder pixel: its centre, and width and height 0.05 * 2 ** level of the unpadded image.

    Args:
        memory: (N, S, C); mask_flatten (N, S) bool, or None (no padding); level_shapes: L pairs (H, W) of ints.

    Returns:
        memory (N, S, C) with padding and proposals too close to the border (outside (0.01, 0.99)) zeroed,
        proposals (N, S, 4) as logits, +inf there.
    """
    batch = memory.shape[0]
    proposals = []
    start = 0
    for level, (height, width) in enumerate(level_shapes):
        if mask_flatten is None:
            valid_height = torch.full((batch,), height, dtype=torch.long, device=memory.device)
            valid_width = torch.full((batch,), width, dtype=torch.long, device=memory.device)
        else:
            mask = mask_flatten[:, start : start + height * width].view(batch, height, width)
            valid_height = (~mask[:, :, 0]).sum(1)
            valid_width = (~mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=memory.device),
            torch.arange(width, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)  # (H, W, 2)
        scale = torch.stack([valid_width, valid_height], -1).view(batch, 1, 1, 2)
        centres = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
        sizes = torch.full_like(centres, 0.05 * (2.0**level))
        proposals.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
        start += height * width
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = ~valid if mask_flatten is None else mask_flatten.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals.to(torch.promote_types(memory.dtype, torch.float32))  # float32 at least: positions


def build_deformable_transformer(cfg: Config) -> DeformableTransformer:
    layer_args = {
        "d_model": cfg.hidden_dim,
        "dim_feedforward": cfg.dim_feedforward,
        "dropout": cfg.dropout,
        "n_levels": cfg.num_feature_levels,
        "n_heads": cfg.nheads,
        "attention_backend": cfg.attention_backend,
    }
    encoder_layer = DeformableEncoderLayer(**layer_args, n_points=cfg.enc_n_points)
    decoder_layer = DeformableDecoderLayer(**layer_args, n_points=cfg.dec_n_points)
    return DeformableTransformer(
        encoder=DeformableEncoder(encoder_layer, cfg.enc_layers),
        decoder=DeformableDecoder(decoder_layer, cfg.dec_layers, with_box_refine=cfg.with_box_refine),
        d_model=cfg.hidden_dim,
        num_feature_levels=cfg.num_feature_levels,
        two_stage=cfg.two_stage,
        two_stage_num_proposals=cfg.num_queries,
    )
