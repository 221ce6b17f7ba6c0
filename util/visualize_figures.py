"""Draw sampling points over an image: one panel per query, or one per query and level or head.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot, so no display or global figure state is
involved; ``figure.savefig(path)`` renders them with Agg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from util.visualize_points import QuerySampling

SPLITS = ("none", "level", "head")
COLOUR_MAP = "plasma"
PANEL_INCHES = 3.5
MAX_COLUMNS = 4


@dataclass
class Panel:
    """One query to draw: ``sampling`` in original-image pixels, and optionally its predicted ``box`` (4,)
    x0, y0, x1, y1 in pixels."""

    title: str
    sampling: QuerySampling
    box: torch.Tensor | None = None


def selected_points(
    sampling: QuerySampling, level: int | None = None, head: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling points (K, 2) and weights (K,) of one level, one head, or all (None), by ascending weight
    (so that the strongest are drawn last, on top)."""
    points, weights = sampling.sampling_points, sampling.attention_weights  # (M, L, P, 2), (M, L, P)
    if head is not None:
        points, weights = points[head : head + 1], weights[head : head + 1]
    if level is not None:
        points, weights = points[:, level : level + 1], weights[:, level : level + 1]
    points, weights = points.reshape(-1, 2), weights.reshape(-1)
    order = torch.argsort(weights, stable=True)
    return points[order], weights[order]


def sampling_figure(image: Image.Image, panels: list[Panel], split: str = "none", title: str = "") -> Figure:
    """Each panel's sampling points over ``image``, coloured by attention weight on one shared scale (with a colour
    bar); its reference point as a cross, its reference box dashed and its predicted box solid where given.

    Args:
        image: the original image; the points are in its pixels.
        panels: the queries, one row each with ``split`` "level" or "head", else up to four to a row.
        split: "none" (all levels and heads in one panel), "level" (a panel per level) or "head" (per head).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not panels:
        figure = Figure(figsize=(PANEL_INCHES, PANEL_INCHES))
        axes = figure.add_subplot()
        axes.imshow(image)
        axes.set_title(f"{title}\n(no queries to show)", fontsize=8)
        axes.axis("off")
        return figure
    num_heads, num_levels, _ = panels[0].sampling.attention_weights.shape
    # (level, head) of each column; rows are the panels unless split is "none".
    columns = {
        "none": [(None, None)],
        "level": [(level, None) for level in range(num_levels)],
        "head": [(None, head) for head in range(num_heads)],
    }[split]
    cells = [(panel, level, head) for panel in panels for level, head in columns]
    num_columns = min(len(panels), MAX_COLUMNS) if split == "none" else len(columns)
    num_rows = math.ceil(len(cells) / num_columns)
    aspect = image.height / image.width
    figure = Figure(
        figsize=(PANEL_INCHES * num_columns + 1.0, PANEL_INCHES * aspect * num_rows + 0.8), layout="constrained"
    )
    highest = max(float(panel.sampling.attention_weights.max()) for panel in panels)
    norm = Normalize(vmin=0.0, vmax=max(highest, 1e-6))
    all_axes = figure.subplots(num_rows, num_columns, squeeze=False).reshape(-1)
    for axes, (panel, level, head) in zip(all_axes, cells):
        part = " ".join(f"{name} {index}" for name, index in (("level", level), ("head", head)) if index is not None)
        draw_panel(axes, image, panel, norm, level, head, f"{panel.title}\n{part}" if part else panel.title)
    for axes in all_axes[len(cells) :]:
        axes.axis("off")
    figure.colorbar(ScalarMappable(norm=norm, cmap=COLOUR_MAP), ax=list(all_axes), label="attention weight", shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def draw_panel(
    axes,
    image: Image.Image,
    panel: Panel,
    norm: Normalize,
    level: int | None = None,
    head: int | None = None,
    title: str = "",
) -> None:
    """One panel on ``axes``: the image, the chosen points (see :func:`selected_points`), the reference and boxes.
    The scatter is the axes' first collection."""
    axes.imshow(image)
    points, weights = selected_points(panel.sampling, level, head)
    axes.scatter(
        points[:, 0].numpy(),
        points[:, 1].numpy(),
        c=weights.numpy(),
        cmap=COLOUR_MAP,
        norm=norm,
        s=14,
        edgecolors="black",
        linewidths=0.3,
        zorder=3,
    )
    if panel.sampling.reference_box is not None:
        axes.add_patch(_rectangle(panel.sampling.reference_box, "white", "--"))
    if panel.box is not None:
        axes.add_patch(_rectangle(panel.box, "lime", "-"))
    x, y = panel.sampling.reference_point.tolist()
    axes.plot([x], [y], marker="+", markersize=14, markeredgewidth=2, color="cyan", linestyle="none", zorder=4)
    axes.set_xlim(0, image.width)
    axes.set_ylim(image.height, 0)
    axes.set_title(title, fontsize=8)
    axes.axis("off")


def _rectangle(box: torch.Tensor, colour: str, linestyle: str) -> Rectangle:
    x0, y0, x1, y1 = box.tolist()
    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linestyle=linestyle, linewidth=1.5)
