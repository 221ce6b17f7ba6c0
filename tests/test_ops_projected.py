"""The inference op that computes the sampling locations and weights inside the cpu kernel from the query's
projection (ops.functional.ms_deform_attn_projected, used by MSDeformAttn.sample once merge_query_projections ran):
against an independent float64 computation (the paper's eq. 3 through ops/reference.py), against the module's own
path, and where the module takes it and where not."""

from __future__ import annotations

import pytest
import torch

from ops import MSDeformAttn, functional, record_sampling
from ops.reference import reference_ms_deform_attn

# odd sizes, a 1x1 level, and a level of one row
LEVEL_SHAPES = [(7, 5), (4, 6), (1, 3), (1, 1)]
HEADS, POINTS, D_MODEL = 3, 4, 3 * 32  # D = 32 takes the AVX-512 loops where built


def _layout():
    shapes = torch.tensor(LEVEL_SHAPES)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return shapes, starts, int(areas.sum())


def _problem(batch: int, queries: int, seed: int) -> dict[str, torch.Tensor]:
    """Offsets of several pixels (some samples land outside their map), logits of spread scale, reference points
    a little beyond [0, 1]; all in float64."""
    generator = torch.Generator().manual_seed(seed)
    shapes, starts, positions = _layout()
    samples = HEADS * len(LEVEL_SHAPES) * POINTS
    offsets = torch.randn(batch, queries, samples * 2, generator=generator, dtype=torch.float64) * 3
    logits = torch.randn(batch, queries, samples, generator=generator, dtype=torch.float64) * 2
    return {
        "value": torch.randn(batch, positions, HEADS, D_MODEL // HEADS, generator=generator, dtype=torch.float64),
        "shapes": shapes,
        "starts": starts,
        "reference": torch.rand(batch, queries, len(LEVEL_SHAPES), 2, generator=generator, dtype=torch.float64) * 1.2
        - 0.1,
        "projected": torch.cat([offsets, logits], -1),
    }


def _expected(problem: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 3 in float64, written out: locations = reference + offset / (W, H), weights = softmax over each head's
    L * P logits, then the float64 reference op."""
    batch, queries, _ = problem["projected"].shape
    levels = len(LEVEL_SHAPES)
    samples = HEADS * levels * POINTS
    offsets = problem["projected"][..., : 2 * samples].reshape(batch, queries, HEADS, levels, POINTS, 2)
    logits = problem["projected"][..., 2 * samples :].reshape(batch, queries, HEADS, levels * POINTS)
    size = problem["shapes"].flip(-1).double()  # (W, H) per level
    locations = problem["reference"][:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
    weights = logits.softmax(-1).reshape(batch, queries, HEADS, levels, POINTS)
    return reference_ms_deform_attn(problem["value"], problem["shapes"], problem["starts"], locations, weights)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("path", ["auto", "avx2", "portable"])
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)]
)
@pytest.mark.parametrize(("batch", "queries"), [(1, 1), (2, 17), (2, 70)])  # 70: runs of 32 and one of 6
def test_matches_the_float64_computation(monkeypatch, path, dtype, tolerance, batch, queries):
    """Value and projection rounded to ``dtype`` (the reference sees the same rounded numbers), reference points
    in float32 (float64 with a float64 value), as the module passes them."""
    monkeypatch.setenv("DETR_MSDA_CPU_KERNEL", path)
    problem = _problem(batch, queries, seed=batch * 100 + queries)
    coordinates = torch.float64 if dtype == torch.float64 else torch.float32
    rounded = {
        **problem,
        "value": problem["value"].to(dtype).double(),
        "projected": problem["projected"].to(dtype).double(),
        "reference": problem["reference"].to(coordinates).double(),
    }
    with torch.no_grad():
        output = functional.ms_deform_attn_projected(
            problem["value"].to(dtype),
            problem["shapes"],
            problem["starts"],
            problem["reference"].to(coordinates),
            problem["projected"].to(dtype),
        )
    assert output.dtype == dtype and output.shape == (batch, queries, D_MODEL)
    assert _relative_error(output, _expected(rounded)) < tolerance


def _merged_module() -> MSDeformAttn:
    torch.manual_seed(0)
    module = MSDeformAttn(D_MODEL, len(LEVEL_SHAPES), HEADS, POINTS, backend="cpu").eval()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.05)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.1)
    module.merge_query_projections()
    return module


def _module_inputs(queries: int = 9, corner: int = 2) -> tuple:
    generator = torch.Generator().manual_seed(7)
    shapes, starts, positions = _layout()
    query = torch.randn(2, queries, D_MODEL, generator=generator)
    reference = torch.rand(2, queries, len(LEVEL_SHAPES), corner, generator=generator)
    flatten = torch.randn(2, positions, D_MODEL, generator=generator)
    return query, reference, flatten, shapes, starts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_module_gives_what_its_own_path_gives(monkeypatch, dtype):
    module = _merged_module().to(dtype)
    query, reference, flatten, shapes, starts = _module_inputs()
    with torch.no_grad():
        fused = module(query.to(dtype), reference, flatten.to(dtype), shapes, starts)
        monkeypatch.setattr(MSDeformAttn, "_samples_in_the_kernel", lambda *args: False)
        unfused = module(query.to(dtype), reference, flatten.to(dtype), shapes, starts)
    assert fused.dtype == dtype
    assert _relative_error(fused, unfused.double()) < (1e-5 if dtype == torch.float32 else 2e-2)


def _calls(monkeypatch) -> list:
    calls = []
    original = functional.ms_deform_attn_projected
    monkeypatch.setattr("ops.module.ms_deform_attn_projected", lambda *args: calls.append(args) or original(*args))
    return calls


def test_the_module_takes_it_only_where_it_applies(monkeypatch):
    calls = _calls(monkeypatch)
    module = _merged_module()
    query, reference, flatten, shapes, starts = _module_inputs()
    with torch.no_grad():
        module(query, reference, flatten, shapes, starts)
    assert len(calls) == 1
    # boxes as references, a gradient to record, a recording of the sampling, projections not merged: not taken
    _, boxes, *_ = _module_inputs(corner=4)
    with torch.no_grad():
        module(query, boxes, flatten, shapes, starts)
    module(query.requires_grad_(), reference, flatten, shapes, starts).sum().backward()
    with torch.no_grad(), record_sampling(module) as recorded:
        module(query, reference, flatten, shapes, starts)
    assert len(recorded) == 1
    module.query_weight = module.query_bias = None
    with torch.no_grad():
        module(query, reference, flatten, shapes, starts)
    assert len(calls) == 1


def test_other_backends_keep_their_own_path(monkeypatch):
    calls = _calls(monkeypatch)
    module = _merged_module()
    module.backend = "pytorch"
    query, reference, flatten, shapes, starts = _module_inputs()
    with torch.no_grad():
        module(query, reference, flatten, shapes, starts)
    assert calls == []
