"""Where the deformable attention looked, in pixels of the original image.

The attention samples at (x, y) in [0, 1] of each *padded* level map, around reference points in the same units
(``ops.MSDeformAttn`` adds its offsets there; ``ops.record_sampling`` records both). This module maps them back to
the image the user gave, in two steps per level l:

    location / valid_ratios[l]        [0, 1] of the unpadded (resized) image; the model's own convention, with
                                      which it places reference points on the padded levels
    * (width, height) of the original  pixels of the original image (the validation resize keeps the aspect ratio,
                                      so [0, 1] of the resized image is [0, 1] of the original)

On coarse levels the unpadded share counts whole cells of the padding mask resized to that level, so it differs a
little from the image's exact share of the padded batch; dividing by it is still right, because the model places
its reference points in those same units. Plain tensors in and out: nothing here runs a model or draws
(``engine.attention_view`` does both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuerySampling:
    """One query's attention in one layer, in pixels (x, y) of the original image.

    Attributes:
        reference_point: (2,) the query's reference point (a box reference's centre).
        sampling_points: (M, L, P, 2) every head's sampling points on every level.
        attention_weights: (M, L, P) their weights; for each head they sum to 1 over levels and points.
        reference_box: (4,) x0, y0, x1, y1 when the reference is a box (decoder with box refinement or two-stage),
            else None.
    """

    reference_point: torch.Tensor
    sampling_points: torch.Tensor
    attention_weights: torch.Tensor
    reference_box: torch.Tensor | None = None


def resolve_layer(layer: int, num_layers: int, name: str) -> int:
    """``layer`` (negative counts from the last) as an index in [0, num_layers); the error names ``name``."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(
            f"layer {layer} does not exist: the {name} has {num_layers} layer(s), "
            f"so layer must be in [{-num_layers}, {num_layers - 1}]"
        )
    return layer % num_layers


def to_image_pixels(locations: torch.Tensor, valid_ratios: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Points on padded level maps -> pixels of the original image.

    Args:
        locations: (..., 2) (x, y) in [0, 1] of a padded level map.
        valid_ratios: (..., 2) broadcastable to ``locations``: the unpadded share (x, y) of the level each point
            lies on.
        image_size: (height, width) of the original image in pixels.

    Returns:
        (..., 2) (x, y) in pixels of the original image; (0, 0) is its top-left corner, (width, height) its
        bottom-right one.
    """
    height, width = image_size
    scale = torch.tensor([width, height], dtype=locations.dtype, device=locations.device)
    return locations / valid_ratios * scale


def _box_to_image_pixels(box: torch.Tensor, valid_ratio: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """(4,) cx, cy, w, h on a padded level; (2,) its valid ratio -> (4,) x0, y0, x1, y1 in original pixels."""
    centre = to_image_pixels(box[:2], valid_ratio, image_size)
    size = to_image_pixels(box[2:], valid_ratio, image_size)
    return torch.cat([centre - size / 2, centre + size / 2])


def query_sampling(
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    reference_points: torch.Tensor,
    valid_ratios: torch.Tensor,
    image_size: tuple[int, int],
) -> QuerySampling:
    """One query's attention in one layer, from the padded levels to pixels of the original image.

    Args:
        sampling_locations: (M, L, P, 2) (x, y) in [0, 1] of each padded level.
        attention_weights: (M, L, P).
        reference_points: (L, 2) points or (L, 4) boxes (cx, cy, w, h) on each padded level: one point of the
            image placed on every level (the model scales it by each level's ratio), so level 0's is drawn.
        valid_ratios: (L, 2) the unpadded share (x, y) of each level.
        image_size: (height, width) of the image before resizing and padding.
    """
    reference_box = None
    if reference_points.shape[-1] == 4:
        reference_box = _box_to_image_pixels(reference_points[0], valid_ratios[0], image_size)
    return QuerySampling(
        reference_point=to_image_pixels(reference_points[0, :2], valid_ratios[0], image_size),
        sampling_points=to_image_pixels(sampling_locations, valid_ratios[None, :, None, :], image_size),
        attention_weights=attention_weights,
        reference_box=reference_box,
    )


def cell_query_index(
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    valid_ratios: torch.Tensor,
    pixel: tuple[float, float],
    image_size: tuple[int, int],
    level: int = 0,
) -> int:
    """The encoder query (an index into the flattened levels) of the level-``level`` cell covering ``pixel``.

    Args:
        spatial_shapes: (L, 2) rows (H, W); level_start_index: (L,); valid_ratios: (L, 2) of the image.
        pixel: (x, y) in pixels of the original image.
        image_size: (height, width) of the original image.
        level: which level's cell serves as the query (0: the finest).
    """
    num_levels = spatial_shapes.shape[0]
    if not 0 <= level < num_levels:
        raise ValueError(f"query level {level} does not exist: the model has {num_levels} feature level(s)")
    height, width = image_size
    x, y = pixel
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(f"point ({x}, {y}) lies outside the {width}x{height} image")
    map_height, map_width = spatial_shapes[level].tolist()
    valid_x, valid_y = valid_ratios[level].tolist()
    valid_width = max(1, round(valid_x * map_width))
    valid_height = max(1, round(valid_y * map_height))
    column = min(int(x / width * valid_width), valid_width - 1)
    row = min(int(y / height * valid_height), valid_height - 1)
    return int(level_start_index[level]) + row * map_width + column
