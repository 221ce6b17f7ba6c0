"""Sine position encoding of feature-map pixels, normalised to each image's unpadded extent."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

EPS = 1e-6  # added to the valid extent that the coordinates are divided by


def sine_embedding(coordinates: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Interleaved sin / cos of ``coordinates / temperature ** (2 * (i // 2) / num_feats)``, i < num_feats.

    Args:
        coordinates: (..., K) float.

    Returns:
        (..., K * num_feats): for each coordinate, sin of the even and cos of the odd frequencies, interleaved.
    """
    index = torch.arange(num_feats, dtype=torch.float32, device=coordinates.device)
    frequencies = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    phases = coordinates[..., None] / frequencies  # (..., K, num_feats)
    embedding = torch.stack((phases[..., 0::2].sin(), phases[..., 1::2].cos()), dim=-1)
    return embedding.flatten(-3)


class PositionEmbeddingSine(nn.Module):
    """DETR's sine encoding as Deformable DETR uses it: pixel centres (index + 0.5), normalised by the valid
    (unpadded) height and width, times ``scale``.

    Args:
        num_pos_feats: channels per axis; the output has 2 * num_pos_feats channels (y first, then x).
        temperature: base of the frequencies.
        scale: the normalised coordinates are multiplied by it (2 * pi by default).

    The encoding depends on the padding mask alone (on the map's size alone without one, :meth:`of`): with
    ``cache_size`` > 0 (set by ``models.inference.prepare_for_inference`` on the CPU) the last ``cache_size``
    encodings are kept, keyed by the mask's content (or the size) and the dtype, and a mask seen before costs a hash
    of its bytes instead of the sines.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale
        self.cache_size = 0
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def forward(self, padding_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """padding_mask (B, H, W) bool, True on padding -> (B, 2 * num_pos_feats, H, W) in ``dtype``."""
        return self._cached(
            dtype,
            lambda: (padding_mask.device, tuple(padding_mask.shape), padding_mask.cpu().numpy().tobytes()),
            lambda: self.encode(padding_mask),
        )

    def of(self, features: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """The encoding of a feature map (B, C, H, W) with its padding mask (B, H, W), in the features' dtype:
        (B, 2 * num_pos_feats, H, W). Without a mask (no padding) computed from the size alone
        (:meth:`encode_size`, the values of an all-False mask)."""
        if padding_mask is not None:
            return self(padding_mask, features.dtype)
        batch, _, height, width = features.shape
        return self._cached(
            features.dtype,
            lambda: (features.device, (batch, height, width), None),
            lambda: self.encode_size(batch, height, width, features.device),
        )

    def _cached(self, dtype: torch.dtype, key: Callable[[], tuple], encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``encode()`` in ``dtype``; with a cache, kept under ``key()`` (computed only then) and the dtype."""
        if self.cache_size == 0 or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return encode().to(dtype)
        key = (*key(), dtype)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        encoding = self._cache[key] = encode().to(dtype)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return encoding

    def encode(self, padding_mask: torch.Tensor) -> torch.Tensor:
        """padding_mask (B, H, W) bool -> (B, 2 * num_pos_feats, H, W) float32, computed."""
        valid = ~padding_mask
        y_embed = valid.cumsum(1, dtype=torch.float32)
        x_embed = valid.cumsum(2, dtype=torch.float32)
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + EPS) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + EPS) * self.scale
        pos_y = sine_embedding(y_embed[..., None], self.num_pos_feats, self.temperature)
        pos_x = sine_embedding(x_embed[..., None], self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)

    def encode_size(self, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """:meth:`encode` of an all-False (batch, height, width) mask, from one row and one column of sines:
        (batch, 2 * num_pos_feats, height, width) float32 (expanded over the batch)."""
        embeddings = []
        for size in (height, width):
            counts = torch.arange(1, size + 1, dtype=torch.float32, device=device)  # what the cumsum counts
            coordinates = (counts - 0.5) / (counts[-1:] + EPS) * self.scale
            embeddings.append(sine_embedding(coordinates[:, None], self.num_pos_feats, self.temperature))
        pos_y, pos_x = embeddings  # (H, F), (W, F)
        shape = (height, width, self.num_pos_feats)
        grid = torch.cat((pos_y[:, None].expand(shape), pos_x[None].expand(shape)), dim=-1)
        return grid.permute(2, 0, 1).expand(batch, -1, -1, -1)


def build_position_encoding(cfg) -> PositionEmbeddingSine:
    if cfg.hidden_dim % 2 != 0:
        raise ValueError(f"hidden_dim must be even for the sine position encoding, got {cfg.hidden_dim}")
    return PositionEmbeddingSine(cfg.hidden_dim // 2, scale=cfg.position_embedding_scale)
