"""Shared fixtures: random multi-scale deformable attention problems, the original checkpoints' keys, the tiny
shapes set and its one-epoch training run (``tests.tiny_training``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the Triton backend's tests run its kernels in Triton's CPU interpreter. @triton.jit reads
# TRITON_INTERPRET when it decorates, i.e. when ops.triton_kernels is imported: set here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The original implementation's published checkpoints: state-dict keys, shapes, parameter counts per variant.
REFERENCE_KEYS = Path(__file__).resolve().parent / "data" / "checkpoint_keys.json"


@pytest.fixture(scope="module")
def coco_path(tmp_path_factory) -> Path:
    """The tiny shapes set of ``tests.tiny_training`` (made once per test module)."""
    from tests.tiny_training import make_shapes

    return make_shapes(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def first_run(coco_path, tmp_path_factory) -> Path:
    """One epoch of the tiny training from scratch (once per test module): its output folder."""
    from tests.tiny_training import run_main, tiny_overrides

    output_dir = tmp_path_factory.mktemp("first")
    assert run_main("train", opts=tiny_overrides(coco_path, output_dir)) == 0
    return output_dir


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


def make_edge_problem(device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values and weights, with every sample on an edge of the op's definition: in each level, each pair of
    pixel coordinates (h, w) from -1 and the size (touching no pixel), just inside them, the first and last pixel
    centres and half a pixel outside them. The sizes are powers of two, so every coordinate is exact."""
    level_shapes = [(2, 4), (4, 8)]
    problem = make_problem(level_shapes, batch=1, queries=49, heads=2, channels=3, points=1, seed=seed)
    for level, (height, width) in enumerate(level_shapes):
        rows, columns = (
            torch.tensor([-1, -1 + 1 / 16, -0.5, 0, size - 1, size - 1 / 16, size], dtype=torch.float64)
            for size in (height, width)
        )
        h, w = torch.meshgrid(rows, columns, indexing="ij")  # 7 x 7 = 49 queries
        locations = torch.stack([(w.flatten() + 0.5) / width, (h.flatten() + 0.5) / height], -1)  # (49, 2) as (x, y)
        problem["sampling_locations"][0, :, :, level, 0] = locations[:, None]
    for name in ("value", "sampling_locations", "attention_weights", "spatial_shapes", "level_start_index"):
        problem[name] = problem[name].to(device)
    return problem


def op_args(problem: dict) -> tuple:
    return tuple(
        problem[name]
        for name in ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    )


def run_with_grads(backend: str, problem: dict, grad_output: torch.Tensor | None = None) -> tuple:
    """(output, gradients of value, sampling_locations and attention_weights, grad_output) of ``backend``."""
    from ops import ms_deform_attn

    value, shapes, starts, locations, weights = op_args(problem)
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    output = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    grad_output = torch.randn_like(output) if grad_output is None else grad_output.to(output)
    grads = torch.autograd.grad(output, leaves, grad_output)
    return output, grads, grad_output


def reference_with_grads(problem: dict, grad_output: torch.Tensor) -> tuple:
    """(output, gradients) of the float64 reference (ops/reference.py) on the problem's inputs, on the CPU."""
    from ops.reference import reference_ms_deform_attn

    leaves = [
        problem[n].detach().double().cpu().requires_grad_()
        for n in ("value", "sampling_locations", "attention_weights")
    ]
    output = reference_ms_deform_attn(leaves[0], problem["spatial_shapes"], problem["level_start_index"], *leaves[1:])
    grads = torch.autograd.grad(output, leaves, grad_output.double().cpu())
    return output.detach(), grads


def assert_compiled_matches_eager(backend: str, problem: dict) -> None:
    """torch.compile(fullgraph=True) of a loss through the op gives eager's value and gradients."""
    from ops import ms_deform_attn

    value, shapes, starts, locations, weights = op_args(problem)

    def loss(v, loc, w):
        return ms_deform_attn(v, shapes, starts, loc, w, backend=backend).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]
    compiled_inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]
    expected = loss(*eager_inputs)
    got = compiled(*compiled_inputs)
    torch.testing.assert_close(got, expected)
    for got_grad, want in zip(torch.autograd.grad(got, compiled_inputs), torch.autograd.grad(expected, eager_inputs)):
        torch.testing.assert_close(got_grad, want)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach()
    return float((got.detach().double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.fixture
def small_problem() -> dict:
    return make_problem([(5, 7), (3, 4), (1, 1)], batch=2, queries=6, heads=3, channels=5, points=4)


@pytest.fixture(scope="session")
def _empty_backend_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("msda_backend_cache")


@pytest.fixture(autouse=True)
def _no_user_backend_choice(monkeypatch, _empty_backend_cache_dir):
    """Tests see neither the user's DETR_MSDA_BACKEND nor the backends that python -m ops.check remembered."""
    from ops import backend_cache

    monkeypatch.delenv("DETR_MSDA_BACKEND", raising=False)
    monkeypatch.setattr(backend_cache, "cache_file", lambda: _empty_backend_cache_dir / "msda_backends.json")
