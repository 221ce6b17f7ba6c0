"""See where a DCN backbone samples: the 9 x 9 x 9 = 729 points of its last three deformable 3x3 convolutions for
a query pixel (Dai et al. 2017, figure 5), and the k x k deformed bins of a deformable RoI pooling.

    with record_sampling(model) as records:             # ops.record_sampling: every deformable module's sampling
        model(images)
    traces = trace_sampling(deform_layers(model, records), [(x, y)], resized_size, image_size)

A query pixel is a cell of the last deformable layer's output. Going back one layer, each of its 9 taps lands at
``cell * stride - padding + tap * dilation + offset``, a fractional cell of the layer before, whose offsets (and
masks) are read there bilinearly; three layers give 729 points, in the first layer's input grid, mapped to image
pixels by that grid's stride. With v2 each point carries the product of the three masks on its path.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import nn

from ops import AttentionSampling, DeformConv2d, OffsetSampling
from ops.deform_roi_pool import deformed_bins, rois_from_boxes

TRACED_LAYERS = 3
PANEL_INCHES = 3.5


@dataclass
class LayerRecord:
    """What one deformable convolution did on its latest forward: offsets (2 G k k, H_out, W_out), mask (G k k,
    H_out, W_out) or None, of image 0, and its input size (H_in, W_in)."""

    name: str
    module: DeformConv2d
    offset: torch.Tensor
    mask: torch.Tensor | None
    input_size: tuple[int, int]


@dataclass
class SamplingTrace:
    """The points of one query pixel: ``points`` (729, 2) x, y in original-image pixels and ``weights`` (729,) the
    product of the masks on each point's path (ones for v1)."""

    pixel: tuple[float, float]
    points: torch.Tensor
    weights: torch.Tensor
    layers: list[str]


def deform_layers(
    model: nn.Module, records: Mapping[str, Sequence[AttentionSampling | OffsetSampling]]
) -> list[LayerRecord]:
    """Every :class:`ops.DeformConv2d` of ``model`` that ran, in forward order, with image 0's offsets and masks of
    its latest forward (in float32 on the CPU), from ``records`` of :func:`ops.record_sampling` on ``model``."""
    layers = []
    for name, forwards in records.items():
        module = model.get_submodule(name)
        if isinstance(module, DeformConv2d):
            sampling = forwards[-1]
            mask = None if sampling.mask is None else sampling.mask[0].float().cpu()
            layers.append(LayerRecord(name, module, sampling.offset[0].float().cpu(), mask, sampling.input_size))
    return layers


def _read(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """maps (C, H, W) read bilinearly (border values outside) at cells (N,) rows and columns -> (N, C)."""
    height, width = maps.shape[-2:]
    grid = torch.stack(((2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1), -1)[None, None]
    return F.grid_sample(maps[None], grid, align_corners=False, padding_mode="border")[0, :, 0].T


def _taps(record: LayerRecord, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cells (N,) of ``record``'s output -> its taps (N, k k) rows and columns in its input grid, and masks."""
    module = record.module
    kh, kw = module.kernel_size
    taps = kh * kw
    offsets = _read(record.offset[: 2 * taps], rows, cols).view(-1, taps, 2)  # offset group 0
    masks = _read(record.mask[:taps], rows, cols) if record.mask is not None else torch.ones(len(rows), taps)
    tap_rows = torch.arange(kh).repeat_interleave(kw) * module.dilation[0]
    tap_cols = torch.arange(kw).repeat(kh) * module.dilation[1]
    new_rows = rows[:, None] * module.stride[0] - module.padding[0] + tap_rows + offsets[..., 0]
    new_cols = cols[:, None] * module.stride[1] - module.padding[1] + tap_cols + offsets[..., 1]
    return new_rows, new_cols, masks


def trace_sampling(
    records: Sequence[LayerRecord],
    pixels: Sequence[tuple[float, float]],
    resized_size: tuple[int, int],
    image_size: tuple[int, int],
    layers: int = TRACED_LAYERS,
) -> list[SamplingTrace]:
    """The ``(k * k) ** layers`` points of the last ``layers`` deformable convolutions for each query pixel.

    Args:
        records: from :func:`deform_layers`, in forward order; the last ``layers`` are traced.
        pixels: query pixels (x, y) in the original image.
        resized_size / image_size: (height, width) of the network's input and of the original image.
    """
    if len(records) < layers:
        raise ValueError(f"tracing {layers} deformable layers needs as many, the model ran {len(records)}")
    chain = list(records[-layers:])
    for before, after in itertools.pairwise(chain):
        out_size = tuple(before.offset.shape[-2:])
        if out_size != after.input_size:
            raise ValueError(f"{after.name} reads a {after.input_size} map, {before.name} writes {out_size}")
    scale_y, scale_x = image_size[0] / resized_size[0], image_size[1] / resized_size[1]
    first_stride = (resized_size[0] / chain[0].input_size[0], resized_size[1] / chain[0].input_size[1])
    last_out = chain[-1].offset.shape[-2:]
    last_stride = (resized_size[0] / last_out[0], resized_size[1] / last_out[1])
    traces = []
    for x, y in pixels:
        row = min(max(round(y / scale_y / last_stride[0] - 0.5), 0), last_out[0] - 1)
        col = min(max(round(x / scale_x / last_stride[1] - 0.5), 0), last_out[1] - 1)
        rows, cols = torch.tensor([float(row)]), torch.tensor([float(col)])
        weights = torch.ones(1)
        for record in reversed(chain):
            rows, cols, masks = _taps(record, rows, cols)
            weights = (weights[:, None] * masks).reshape(-1)
            rows, cols = rows.reshape(-1), cols.reshape(-1)
        points = torch.stack(
            ((cols + 0.5) * first_stride[1] * scale_x - 0.5, (rows + 0.5) * first_stride[0] * scale_y - 0.5), -1
        )
        traces.append(SamplingTrace((float(x), float(y)), points, weights, [record.name for record in chain]))
    return traces


def dcn_figure(image: Image.Image, traces: Sequence[SamplingTrace], modulated: bool) -> Figure:
    """A panel per query pixel: its points over ``image``, coloured by modulation (v2) or all alike (v1)."""
    columns = max(len(traces), 1)
    figure = Figure(figsize=(PANEL_INCHES * columns + (1 if modulated else 0), PANEL_INCHES))
    axes = figure.subplots(1, columns, squeeze=False)[0]
    norm = Normalize(0, max((float(trace.weights.max()) for trace in traces), default=1.0) or 1.0)
    for ax, trace in zip(axes, traces, strict=False):
        ax.imshow(image)
        order = torch.argsort(trace.weights)
        points = trace.points[order]
        colours = trace.weights[order].numpy() if modulated else "red"
        ax.scatter(points[:, 0], points[:, 1], s=4, c=colours, cmap="plasma", norm=norm, linewidths=0)
        ax.plot(*trace.pixel, marker="*", color="lime", markersize=10, markeredgecolor="black")
        ax.set_xlim(0, image.width)
        ax.set_ylim(image.height, 0)
        ax.set_title(f"({trace.pixel[0]:.0f}, {trace.pixel[1]:.0f}): {len(points)} points", fontsize=8)
        ax.axis("off")
    if modulated:
        figure.colorbar(ScalarMappable(norm, "plasma"), ax=list(axes), label="product of the masks")
    if traces:
        figure.suptitle("DCN sampling: " + ", ".join(traces[0].layers), fontsize=8)
    return figure


def write_dcn_visualization(
    records: Sequence[LayerRecord],
    pixels: Sequence[tuple[float, float]],
    image: Image.Image,
    resized_size: tuple[int, int],
    out_dir: str | Path,
    stem: str,
) -> list[Path]:
    """``out_dir/<stem>_dcn_sampling.png`` and a ``"dcn"`` entry (layers, and per pixel its points and weights)
    in ``<stem>_sampling.json`` (created if absent); nothing when fewer than three deformable layers ran."""
    if len(records) < TRACED_LAYERS or not pixels:
        return []
    traces = trace_sampling(records, pixels, resized_size, (image.height, image.width))
    modulated = records[-1].mask is not None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}_dcn_sampling.png"
    dcn_figure(image, traces, modulated).savefig(png, dpi=100)
    path = out_dir / f"{stem}_sampling.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record["dcn"] = {
        "layers": traces[0].layers,
        "modulated": modulated,
        "queries": [
            {
                "pixel": list(trace.pixel),
                "points": torch.round(trace.points.double(), decimals=2).tolist(),
                "weights": torch.round(trace.weights.double(), decimals=4).tolist(),
            }
            for trace in traces
        ],
    }
    path.write_text(json.dumps(record, indent=1))
    return [png, path]


def roi_bins_figure(
    image: Image.Image,
    boxes: torch.Tensor,
    offset: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    output_size: tuple[int, int] = (7, 7),
    gamma: float = 0.1,
) -> Figure:
    """Each box (dashed) and its k x k deformed bins (solid; coloured by modulation with ``mask``) over ``image``.

    Args:
        boxes: (K, 4) x1, y1, x2, y2 in the image's pixels.
        offset: (K, 2, kh, kw) as ``ops.deform_roi_pool`` takes it, or None; mask (K, 1, kh, kw) or None.
    """
    rois = rois_from_boxes([boxes.float()])
    bins = deformed_bins(rois, offset, output_size, 1.0, gamma).detach()  # (K, kh, kw, 4)
    figure = Figure(figsize=(PANEL_INCHES + 1, PANEL_INCHES))
    ax = figure.subplots()
    ax.imshow(image)
    norm, colours = Normalize(0, 1), ScalarMappable(Normalize(0, 1), "plasma")
    for index, box in enumerate(boxes.tolist()):
        ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ls="--", color="white"))
        for i in range(bins.shape[1]):
            for j in range(bins.shape[2]):
                x1, y1, x2, y2 = bins[index, i, j].tolist()
                colour = colours.to_rgba(float(mask[index, 0, i, j])) if mask is not None else "lime"
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=0.8, color=colour))
    if mask is not None:
        figure.colorbar(ScalarMappable(norm, "plasma"), ax=ax, label="modulation")
    ax.set_xlim(0, image.width)
    ax.set_ylim(image.height, 0)
    ax.axis("off")
    return figure
