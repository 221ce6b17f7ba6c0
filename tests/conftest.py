"""Shared fixtures: random multi-scale deformable attention problems, the original checkpoints' keys."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# The original implementation's published checkpoints: state-dict keys, shapes, parameter counts per variant.
REFERENCE_KEYS = Path(__file__).resolve().parent / "data" / "checkpoint_keys.json"


@pytest.fixture(scope="session")
def reference() -> dict:
    """The published checkpoints' keys, shapes and parameter counts per variant (``tests/data``)."""
    return json.loads(REFERENCE_KEYS.read_text())["variants"]


def make_problem(
    level_shapes: list[tuple[int, int]],
    batch: int,
    queries: int,
    heads: int,
    channels: int,
    points: int,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Fresh random inputs with locations spread over [-0.25, 1.25] (a share outside the map) and some
    exactly on the borders 0 and 1."""
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(1 << 30, ())))
    shapes = torch.tensor(level_shapes, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    levels = len(level_shapes)
    value = torch.randn(batch, int(areas.sum()), heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
    locations = locations * 1.5 - 0.25
    on_border = torch.rand(locations.shape, generator=generator) < 0.1
    border = torch.randint(0, 2, locations.shape, generator=generator).double()
    locations = torch.where(on_border, border, locations)
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=torch.float64)
    floats = {"value": value, "sampling_locations": locations, "attention_weights": weights}
    problem = {name: tensor.to(device=device, dtype=dtype) for name, tensor in floats.items()}
    problem["spatial_shapes"] = shapes.to(device)
    problem["level_start_index"] = starts.to(device)
    problem["level_shapes"] = [tuple(shape) for shape in level_shapes]
    return problem


def op_args(problem: dict) -> tuple:
    return tuple(
        problem[name]
        for name in ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    )


@pytest.fixture
def small_problem() -> dict:
    return make_problem([(5, 7), (3, 4), (1, 1)], batch=2, queries=6, heads=3, channels=5, points=4)
