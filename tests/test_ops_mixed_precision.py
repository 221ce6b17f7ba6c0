"""Mixed dtypes to ms_deform_attn: bfloat16 value and weights with float32 sampling locations, as the
bfloat16 inference path (models/inference.py) calls the op."""

from __future__ import annotations

import pytest
import torch

from ops import ms_deform_attn
from tests.conftest import make_problem, op_args, reference_with_grads, relative_error

BACKENDS = ["cpu", "pytorch"]


def _mixed(problem: dict) -> dict:
    mixed = dict(problem)
    mixed["value"] = problem["value"].bfloat16()
    mixed["attention_weights"] = problem["attention_weights"].bfloat16()
    mixed["sampling_locations"] = problem["sampling_locations"].float()
    return mixed


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_run_in_float32_and_return_value_dtype(backend):
    problem = _mixed(make_problem([(9, 13), (5, 7), (1, 1)], batch=1, queries=17, heads=2, channels=8, points=3))
    value, shapes, starts, locations, weights = op_args(problem)
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    output = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    assert output.dtype == torch.bfloat16
    grad_output = torch.randn(output.shape, dtype=torch.float64)
    grads = torch.autograd.grad(output, leaves, grad_output.bfloat16())
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.bfloat16]

    # the same inputs in float32: the mixed call is exactly it, rounded to bfloat16 at the end
    as_float = [t.float() for t in (value, locations, weights)]
    expected = ms_deform_attn(as_float[0], shapes, starts, as_float[1], as_float[2], backend=backend)
    torch.testing.assert_close(output, expected.bfloat16(), rtol=0, atol=0)

    # and against the float64 reference on the rounded inputs: only the output's bfloat16 rounding remains
    want, want_grads = reference_with_grads(problem, grad_output.bfloat16().double())
    assert relative_error(output, want) < 1e-2
    for got, ref in zip(grads, want_grads):
        assert relative_error(got, ref) < 2e-2


def test_float32_locations_beat_bfloat16_locations():
    """The reason for mixed dtypes: a bfloat16 coordinate resolves only 1/256 of the map, so on a 64-pixel-wide
    level the samples move by up to a quarter pixel; float32 locations keep the float64 answer."""
    problem = make_problem([(64, 64)], batch=1, queries=64, heads=1, channels=4, points=4, seed=3)
    value, shapes, starts, locations, weights = op_args(problem)
    exact, _ = reference_with_grads(problem, torch.zeros(1, 64, 4, dtype=torch.float64))
    rounded_value, rounded_weights = value.bfloat16(), weights.bfloat16()
    with_float_locations = ms_deform_attn(rounded_value, shapes, starts, locations.float(), rounded_weights)
    all_bfloat16 = ms_deform_attn(rounded_value, shapes, starts, locations.bfloat16(), rounded_weights)
    assert relative_error(with_float_locations, exact) < relative_error(all_bfloat16, exact) / 2


def test_autocast_returns_the_common_dtype():
    problem = _mixed(make_problem([(4, 6)], batch=2, queries=5, heads=2, channels=4, points=2, seed=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ms_deform_attn(*op_args(problem), backend="pytorch")
    assert output.dtype == torch.float32


@pytest.mark.parametrize("path", ["auto", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [32, 12])
def test_without_gradients_the_cpu_kernel_samples_half_value_at_float_locations(monkeypatch, path, dtype, channels):
    """The inference path: no gradient recorded, the cpu kernel takes the half-precision value with float32
    locations and weights as they are (no float32 copy of value), sums in float32 and returns value's dtype;
    against the float64 reference on the same inputs only the output's rounding remains. D = 32 runs the widest
    loops built, D = 12 the portable ones."""
    monkeypatch.setenv("DETR_MSDA_CPU_KERNEL", path)
    problem = make_problem([(7, 5), (4, 6), (2, 1), (1, 1)], batch=2, queries=13, heads=3, channels=channels, points=4)
    problem["value"] = problem["value"].to(dtype)
    problem["sampling_locations"] = problem["sampling_locations"].float()
    problem["attention_weights"] = problem["attention_weights"].float()
    value, shapes, starts, locations, weights = op_args(problem)

    from ops import functional

    seen = []
    run_kernel = functional._run_kernel
    monkeypatch.setattr(functional, "_run_kernel", lambda *args: seen.append(args) or run_kernel(*args))
    with torch.no_grad():
        output = ms_deform_attn(value, shapes, starts, locations, weights, backend="cpu")
    assert [(args[1].dtype, args[4].dtype, args[5].dtype) for args in seen] == [(dtype, torch.float32, torch.float32)]
    assert output.dtype == dtype
    want, _ = reference_with_grads(problem, torch.zeros(output.shape, dtype=torch.float64))
    assert relative_error(output, want) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    # the promoted float32 computation, rounded once at the end: the same up to that rounding
    expected = ms_deform_attn(value.float(), shapes, starts, locations, weights, backend="cpu").to(dtype)
    assert relative_error(output, expected.double()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_with_gradients_mixed_dtypes_still_run_the_promoted_kernel(monkeypatch):
    """The half-at-float kernel has no backward: a call that records gradients runs the common dtype."""
    from ops import functional

    problem = _mixed(make_problem([(5, 4), (2, 2)], batch=1, queries=6, heads=2, channels=32, points=2, seed=2))
    problem["attention_weights"] = problem["attention_weights"].float()
    value, shapes, starts, locations, weights = op_args(problem)
    seen = []
    run_kernel = functional._run_kernel
    monkeypatch.setattr(functional, "_run_kernel", lambda *args: seen.append(args) or run_kernel(*args))
    output = ms_deform_attn(value.requires_grad_(), shapes, starts, locations, weights, backend="cpu")
    (grad,) = torch.autograd.grad(output.float().sum(), [value])
    assert [args[1].dtype for args in seen] == [torch.float32] and grad.dtype == torch.bfloat16


def test_the_kernel_refuses_float_locations_with_a_float32_value():
    """Only a half-precision value may come with float32 locations and weights; other mixes are refused, by the
    kernel too (a direct call through torch.ops)."""
    from ops.functional import _load_kernel

    _load_kernel("cpu")
    problem = make_problem([(3, 3)], batch=1, queries=2, heads=1, channels=4, points=1)
    value, shapes, starts, locations, weights = op_args(problem)
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.deformable_detr.ms_deform_attn_forward(value, shapes, starts, locations.float(), weights.float())
