"""See where the model looks: reference points, sampling points and attention weights of one encoder and one decoder
layer (the last by default, as in the paper's figure), drawn over the original image and written as JSON.

From a notebook::

    from datasets.transforms import build_transforms
    from engine.attention_view import decoder_figure, encoder_figure, sample_attention, write_visualization

    view = sample_attention(model, image, build_transforms("val"), threshold=0.5)  # image: a PIL image
    decoder_figure(view).savefig("decoder.png")       # a matplotlib Figure: a panel per top detection
    encoder_figure(view, split="level")               # a panel per query pixel and level
    write_visualization(view, "out", "photo")         # out/photo_detections.png, photo_{decoder,encoder}_sampling.png,
                                                      # photo_sampling.json

The model runs once, within ``ops.record_sampling``: the points are those that ``ops.MSDeformAttn`` itself
sampled, mapped to the original image's pixels by :mod:`util.visualize_points`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torchvision.ops import box_convert

from datasets.transforms import Transform
from models.deformable_transformer import valid_ratio
from ops import AttentionSampling, OffsetSampling, record_sampling
from util.draw import class_name, draw_detections
from util.image_io import to_rgb
from util.visualize_figures import Panel, sampling_figure
from util.visualize_points import QuerySampling, cell_query_index, query_sampling, resolve_layer

Records = dict[str, list[AttentionSampling | OffsetSampling]]  # what ops.record_sampling yields


@dataclass
class Detection:
    """An object query's best class: ``box`` (4,) x0, y0, x1, y1 in pixels of the original image."""

    query: int
    label: int
    score: float
    box: torch.Tensor


@dataclass
class DecoderQuery:
    detection: Detection
    above_threshold: bool
    sampling: QuerySampling


@dataclass
class EncoderQuery:
    """The encoder query at ``pixel`` (x, y in original pixels): index ``query`` of the flattened levels."""

    pixel: tuple[float, float]
    query: int
    sampling: QuerySampling


@dataclass
class AttentionView:
    """Everything :func:`sample_attention` found for one image; all coordinates in its original pixels."""

    image: Image.Image
    resized_size: tuple[int, int]  # (height, width) the model saw, before padding
    spatial_shapes: list[tuple[int, int]]  # (H_l, W_l) of each level
    threshold: float
    detections: list[Detection]  # every query scoring at least threshold, best first
    decoder_layer: int
    decoder: list[DecoderQuery]
    encoder_layer: int
    encoder_query_level: int
    encoder: list[EncoderQuery]
    records: Records  # every deformable module's sampling in that forward (a DCN backbone's too), on the CPU


def run_with_sampling(
    model: nn.Module, image: Image.Image, transforms: Transform
) -> tuple[dict, Records, tuple[int, int]]:
    """``image`` through ``transforms`` (the validation resize and normalisation) and ``model`` in eval mode within
    :func:`ops.record_sampling` -> the outputs (batch of one), the records (both on the CPU, floating point in
    float32) and the resized (height, width)."""
    no_boxes = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    tensor, _ = transforms(to_rgb(image), no_boxes)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), record_sampling(model) as records:
        outputs = model(tensor[None].to(device))
    records = {name: [sampling.map_tensors(_to_cpu) for sampling in forwards] for name, forwards in records.items()}
    return _to_cpu(outputs), records, (int(tensor.shape[-2]), int(tensor.shape[-1]))


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu() if value.is_floating_point() else value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    return value


def attention_layers(records: Records, part: str) -> list[AttentionSampling]:
    """The latest forward of each deformable attention of a ``DeformableDETR``'s ``part`` ("encoder" or
    "decoder"), layer by layer, from ``records`` of the whole model."""
    prefix = f"transformer.{part}."
    return [forwards[-1] for name, forwards in records.items() if name.startswith(prefix)]


def level_valid_ratios(sampling: AttentionSampling) -> torch.Tensor:
    """(N, L, 2) the unpadded share (x, y) of each level, from the padding mask the attention took, as the
    transformer computes it (:func:`models.deformable_transformer.valid_ratio`); ones without a mask."""
    batch = sampling.sampling_locations.shape[0]
    shapes = [tuple(shape) for shape in sampling.spatial_shapes.tolist()]
    if sampling.padding_mask is None:
        return torch.ones(batch, len(shapes), 2)
    masks = sampling.padding_mask.split([height * width for height, width in shapes], 1)
    return torch.stack([valid_ratio(mask.view(batch, *shape)) for mask, shape in zip(masks, shapes)], 1)


def ranked_queries(outputs: dict, image_size: tuple[int, int], batch_index: int = 0) -> list[Detection]:
    """Every object query of image ``batch_index`` with its highest-scoring class, best first.

    ``pred_boxes`` (B, Q, 4) cx, cy, w, h in [0, 1] of the unpadded image become x0, y0, x1, y1 in pixels of the
    original image of ``image_size`` (height, width).
    """
    scores, labels = outputs["pred_logits"][batch_index].sigmoid().max(-1)  # (Q,)
    height, width = image_size
    boxes = box_convert(outputs["pred_boxes"][batch_index], "cxcywh", "xyxy")
    boxes = boxes * torch.tensor([width, height, width, height], dtype=boxes.dtype)
    order = torch.argsort(scores, descending=True, stable=True)
    return [Detection(int(query), int(labels[query]), float(scores[query]), boxes[query]) for query in order]


def sample_attention(
    model: nn.Module,
    image: Image.Image,
    transforms: Transform,
    *,
    threshold: float = 0.5,
    top_k: int = 4,
    points: Sequence[tuple[float, float]] | None = None,
    layer: int = -1,
    query_level: int = 0,
) -> AttentionView:
    """Run ``model`` on ``image`` once and collect where layer ``layer`` of its encoder and decoder looked.

    Args:
        model: a ``DeformableDETR`` (any variant); it runs once, in eval mode.
        image: the original image in any mode (read as :func:`util.image_io.to_rgb` says; the view keeps the RGB
            version); ``transforms`` resize and normalise it as in evaluation.
        threshold: detections scoring at least this are listed; the decoder panels show the best ``top_k`` of
            them, or the best ``top_k`` queries (marked below threshold) when none reaches it.
        points: encoder query pixels (x, y) in the original image; None: the centres of the decoder panels' boxes.
        layer: encoder and decoder layer (negative counts from the last).
        query_level: the level whose cell at each point serves as the encoder query (0: the finest).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    image = to_rgb(image)
    outputs, records, resized_size = run_with_sampling(model, image, transforms)
    image_size = (image.height, image.width)
    ranked = ranked_queries(outputs, image_size)
    detections = [detection for detection in ranked if detection.score >= threshold]
    shown = detections[:top_k] or ranked[:top_k]
    decoder_layers, encoder_layers = attention_layers(records, "decoder"), attention_layers(records, "encoder")
    decoder_layer = resolve_layer(layer, len(decoder_layers), "decoder")
    encoder_layer = resolve_layer(layer, len(encoder_layers), "encoder")
    decoder_sampling, encoder_sampling = decoder_layers[decoder_layer], encoder_layers[encoder_layer]
    valid_ratios = level_valid_ratios(encoder_sampling)[0]  # (L, 2) of image 0, the same for every layer
    decoder = [
        DecoderQuery(
            detection,
            detection.score >= threshold,
            _query_sampling(decoder_sampling, detection.query, valid_ratios, image_size),
        )
        for detection in shown
    ]
    if points is None:
        points = [_box_centre(detection.box, image_size) for detection in shown]
    encoder = []
    for pixel in points:
        shapes, starts = encoder_sampling.spatial_shapes, encoder_sampling.level_start_index
        query = cell_query_index(shapes, starts, valid_ratios, pixel, image_size, query_level)
        encoder.append(
            EncoderQuery(
                (float(pixel[0]), float(pixel[1])),
                query,
                _query_sampling(encoder_sampling, query, valid_ratios, image_size),
            )
        )
    return AttentionView(
        image=image,
        resized_size=resized_size,
        spatial_shapes=[tuple(shape) for shape in encoder_sampling.spatial_shapes.tolist()],
        threshold=threshold,
        detections=detections,
        decoder_layer=decoder_layer,
        decoder=decoder,
        encoder_layer=encoder_layer,
        encoder_query_level=query_level,
        encoder=encoder,
        records=records,
    )


def _query_sampling(
    sampling: AttentionSampling, query: int, valid_ratios: torch.Tensor, image_size: tuple[int, int]
) -> QuerySampling:
    """Query ``query`` of image 0 in one attention layer, in pixels of the original image."""
    return query_sampling(
        sampling.sampling_locations[0, query],
        sampling.attention_weights[0, query],
        sampling.reference_points[0, query],
        valid_ratios,
        image_size,
    )


def _box_centre(box: torch.Tensor, image_size: tuple[int, int]) -> tuple[float, float]:
    """The centre of ``box`` (x0, y0, x1, y1), moved into the image."""
    height, width = image_size
    x0, y0, x1, y1 = box.tolist()
    return min(max((x0 + x1) / 2, 0.0), float(width)), min(max((y0 + y1) / 2, 0.0), float(height))


def decoder_figure(view: AttentionView, split: str = "none", names: Mapping[int, str] | None = None) -> Figure:
    """A panel per shown detection (per detection and level / head with ``split``): predicted box, reference point
    (and reference box) and the decoder layer's sampling points coloured by attention weight."""
    panels = []
    for item in view.decoder:
        detection = item.detection
        mark = "" if item.above_threshold else " (below threshold)"
        panels.append(
            Panel(
                f"query {detection.query}: {class_name(names, detection.label)} {detection.score:.2f}{mark}",
                item.sampling,
                detection.box,
            )
        )
    return sampling_figure(view.image, panels, split, f"decoder layer {view.decoder_layer}: cross-attention")


def encoder_figure(view: AttentionView, split: str = "none") -> Figure:
    """A panel per query pixel (per pixel and level / head with ``split``): its reference point and the encoder
    layer's sampling points coloured by attention weight."""
    panels = [Panel(f"pixel ({item.pixel[0]:.0f}, {item.pixel[1]:.0f})", item.sampling) for item in view.encoder]
    return sampling_figure(
        view.image,
        panels,
        split,
        f"encoder layer {view.encoder_layer}: self-attention (queries on level {view.encoder_query_level})",
    )


def sampling_record(view: AttentionView, names: Mapping[int, str] | None = None) -> dict:
    """Everything the figures show, as JSON-ready values (pixels of the original image; boxes x0, y0, x1, y1)."""

    def detection_record(detection: Detection) -> dict:
        return {
            "query": detection.query,
            "label": detection.label,
            "name": class_name(names, detection.label),
            "score": round(detection.score, 6),
            "box": _rounded(detection.box),
        }

    return {
        "image_size": [view.image.height, view.image.width],
        "resized_size": list(view.resized_size),
        "spatial_shapes": [list(shape) for shape in view.spatial_shapes],
        "threshold": view.threshold,
        "detections": [detection_record(detection) for detection in view.detections],
        "decoder": {
            "layer": view.decoder_layer,
            "queries": [
                {
                    **detection_record(item.detection),
                    "above_threshold": item.above_threshold,
                    **_sampling_record(item.sampling),
                }
                for item in view.decoder
            ],
        },
        "encoder": {
            "layer": view.encoder_layer,
            "query_level": view.encoder_query_level,
            "queries": [
                {
                    "pixel": [round(value, 3) for value in item.pixel],
                    "query": item.query,
                    **_sampling_record(item.sampling),
                }
                for item in view.encoder
            ],
        },
    }


def _sampling_record(sampling: QuerySampling) -> dict:
    """``reference_point``, ``reference_box`` (or None) and ``levels``: per level, per head, the
    ``sampling_points`` [[x, y] * P] and their ``attention_weights`` [P]."""
    num_heads, num_levels, _ = sampling.attention_weights.shape
    levels = [
        {
            "level": level,
            "heads": [
                {
                    "head": head,
                    "sampling_points": _rounded(sampling.sampling_points[head, level]),
                    "attention_weights": _rounded(sampling.attention_weights[head, level], 6),
                }
                for head in range(num_heads)
            ],
        }
        for level in range(num_levels)
    ]
    box = None if sampling.reference_box is None else _rounded(sampling.reference_box)
    return {"reference_point": _rounded(sampling.reference_point), "reference_box": box, "levels": levels}


def _rounded(tensor: torch.Tensor, digits: int = 3) -> list:
    return torch.round(tensor.double(), decimals=digits).tolist()


def write_visualization(
    view: AttentionView,
    out_dir: str | Path,
    stem: str,
    names: Mapping[int, str] | None = None,
    by_level: bool = False,
    by_head: bool = False,
) -> list[Path]:
    """Write ``out_dir/<stem>_detections.png`` (every detection at or above the threshold, drawn by
    ``util.draw``), ``<stem>_decoder_sampling.png``, ``<stem>_encoder_sampling.png`` (with ``by_level`` /
    ``by_head`` also ``..._by_level.png`` / ``..._by_head.png``) and ``<stem>_sampling.json``; returns the paths.

    ``names`` maps labels to class names (``class N`` where missing), as for ``main.py predict``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    detections = view.detections
    path = out_dir / f"{stem}_detections.png"
    draw_detections(
        view.image,
        [detection.box.tolist() for detection in detections],
        [detection.label for detection in detections],
        [detection.score for detection in detections],
        names,
    ).save(path)
    written = [path]
    splits = ["none"] + (["level"] if by_level else []) + (["head"] if by_head else [])
    for split in splits:
        suffix = "" if split == "none" else f"_by_{split}"
        for part, figure in (("decoder", decoder_figure(view, split, names)), ("encoder", encoder_figure(view, split))):
            path = out_dir / f"{stem}_{part}_sampling{suffix}.png"
            figure.savefig(path, dpi=100)
            written.append(path)
    path = out_dir / f"{stem}_sampling.json"
    path.write_text(json.dumps(sampling_record(view, names), indent=1))
    written.append(path)
    return written
