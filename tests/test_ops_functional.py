"""ms_deform_attn: every backend against the independent float64 reference, gradients, dispatch."""

from __future__ import annotations

import warnings

import pytest
import torch

from ops import available_backends, functional, ms_deform_attn
from ops.build import KernelBuildError
from ops.reference import reference_ms_deform_attn
from tests.conftest import (
    assert_compiled_matches_eager,
    make_edge_problem,
    make_problem,
    op_args,
    reference_with_grads,
    relative_error,
    run_with_grads,
)

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["pytorch", "deformconv", "cpu"] + (["cuda"] if HAS_CUDA else [])
DEVICE = {"pytorch": "cpu", "deformconv": "cpu", "cpu": "cpu", "cuda": "cuda"}

# (levels, batch, queries, heads, channels, points)
CASES = {
    "single_level": ([(6, 9)], 1, 5, 2, 3, 2),
    "one_by_one_maps": ([(1, 1), (1, 1)], 3, 4, 2, 4, 3),
    "one_query": ([(4, 5), (2, 3)], 1, 1, 1, 7, 4),
    "odd_sizes_batch3": ([(7, 5), (3, 3), (2, 1)], 3, 9, 3, 13, 4),
    "model_like": ([(8, 8), (4, 4), (2, 2), (1, 1)], 2, 10, 8, 32, 4),
    "encoder_like": ([(5, 7), (3, 4)], 2, 47, 2, 4, 3),  # a query per position: deformconv's grid layout
}
# nondet_tol of the float64 gradchecks of the CUDA kernel (and its emulation): atomics add a value-gradient
# element's contributions in any order, which changes the float64 sum by a few ulps of its largest partial sum;
# entries here are O(1) with at most Lq * L * P = 72 contributions, so 72 * 2^-52 * O(10) < 1e-12 bounds any
# reordering while a wrong gradient (off by far more) still fails.
NONDET_TOL = 1e-12


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_forward_and_gradients_match_reference(backend, case):
    problem = make_problem(*CASES[case][:1], *CASES[case][1:], device=DEVICE[backend])
    output, grads, grad_output = run_with_grads(backend, problem)
    expected, expected_grads = reference_with_grads(problem, grad_output)
    torch.testing.assert_close(output.cpu(), expected, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_on_the_edges_of_the_map_match_reference(backend):
    """Pixel coordinates -1 and the size touch nothing (gradients included), just inside them they do."""
    problem = make_edge_problem(device=DEVICE[backend])
    output, grads, grad_output = run_with_grads(backend, problem)
    expected, expected_grads = reference_with_grads(problem, grad_output)
    torch.testing.assert_close(output.cpu(), expected, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_reference_within_float32_rounding(backend):
    problem = make_problem(
        *CASES["model_like"][:1], *CASES["model_like"][1:], dtype=torch.float32, device=DEVICE[backend]
    )
    output, grads, grad_output = run_with_grads(backend, problem)
    expected, expected_grads = reference_with_grads(problem, grad_output)
    assert relative_error(output, expected) < 1e-5
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernel_half_precision_accumulates_in_float32(dtype):
    problem = make_problem([(6, 5), (3, 2)], 2, 7, 2, 16, 4, dtype=dtype)
    output, grads, grad_output = run_with_grads("cpu", problem)
    assert output.dtype == dtype and all(g.dtype == dtype for g in grads)
    expected, expected_grads = reference_with_grads(problem, grad_output)  # the same rounded inputs, in float64
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert relative_error(output, expected) < tolerance
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) < 3 * tolerance


@pytest.mark.parametrize("backend", ["cpu", "pytorch"])
def test_gradcheck_float64(backend, small_problem):
    value, shapes, starts, locations, weights = op_args(small_problem)
    inputs = tuple(t.detach().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w, backend=backend), inputs
    )


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_cuda_kernel_dtypes_match_reference(dtype, tolerance):
    problem = make_problem(*CASES["model_like"][:1], *CASES["model_like"][1:], dtype=dtype, device="cuda")
    output, grads, grad_output = run_with_grads("cuda", problem)
    expected, expected_grads = reference_with_grads(problem, grad_output)
    assert output.dtype == dtype
    assert relative_error(output, expected) < tolerance
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) < 3 * tolerance


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_gradcheck_float64():
    problem = make_problem([(5, 7), (3, 4), (1, 1)], 2, 6, 3, 5, 4, device="cuda")
    value, shapes, starts, locations, weights = op_args(problem)
    inputs = tuple(t.detach().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w, backend="cuda"), inputs, nondet_tol=NONDET_TOL
    )


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_backward_raises_under_deterministic_algorithms():
    problem = make_problem([(5, 7), (3, 4)], 1, 4, 2, 8, 2, dtype=torch.float32, device="cuda")
    value, shapes, starts, locations, weights = op_args(problem)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        output = ms_deform_attn(value.requires_grad_(), shapes, starts, locations, weights, backend="cuda")
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward"):
            output.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_non_contiguous_inputs_give_the_contiguous_result(small_problem):
    value, shapes, starts, locations, weights = op_args(small_problem)
    strided_value = value.transpose(2, 3).contiguous().transpose(2, 3)
    strided_locations = locations.flip(-1).contiguous().flip(-1)  # flip twice: same values, negative strides
    assert not strided_value.is_contiguous()
    expected = ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
    got = ms_deform_attn(strided_value, shapes, starts, strided_locations, weights, backend="cpu")
    torch.testing.assert_close(got, expected)


def test_int32_spatial_shapes_are_accepted(small_problem):
    value, shapes, starts, locations, weights = op_args(small_problem)
    expected = ms_deform_attn(value, shapes, starts, locations, weights, backend="cpu")
    got = ms_deform_attn(value, shapes.int(), starts.int(), locations, weights, backend="cpu")
    torch.testing.assert_close(got, expected)


def test_autocast_promotes_to_the_common_dtype(small_problem):
    value, shapes, starts, locations, weights = op_args(small_problem)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ms_deform_attn(value.bfloat16(), shapes, starts, locations.float(), weights.float())
    assert output.dtype == torch.float32
    expected = reference_ms_deform_attn(
        value.bfloat16().double(), shapes, starts, locations.float().double(), weights.float().double()
    )
    assert relative_error(output, expected) < 1e-5


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    assert functional.resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_auto_falls_back_to_pytorch_with_a_single_warning(monkeypatch, small_problem):
    def broken(kind):
        raise KernelBuildError(f"building the {kind} kernel failed: no compiler")

    monkeypatch.setattr(functional, "_load_kernel", broken)
    monkeypatch.setattr(functional, "_warned_fallback", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(*op_args(small_problem))
        ms_deform_attn(*op_args(small_problem))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falls back to the pytorch backend" in messages[0]
    torch.testing.assert_close(first, ms_deform_attn(*op_args(small_problem), backend="pytorch"))


def test_explicit_backend_that_cannot_build_raises(monkeypatch, small_problem):
    def broken(kind):
        raise KernelBuildError("no compiler")

    monkeypatch.setattr(functional, "_load_kernel", broken)
    with pytest.raises(KernelBuildError):
        ms_deform_attn(*op_args(small_problem), backend="cpu")


def test_backend_for_another_device_is_rejected(small_problem):
    with pytest.raises(ValueError, match="backend 'cuda' runs on cuda tensors but value is on cpu"):
        ms_deform_attn(*op_args(small_problem), backend="cuda")


def test_unknown_backend_is_rejected(small_problem):
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(*op_args(small_problem), backend="tpu")


def test_available_backends_lists_the_cpu_kernel():
    backends = available_backends()
    assert backends[:2] == ["pytorch", "cpu"]
    assert ("cuda" in backends) == HAS_CUDA


def test_custom_op_registration_passes_opcheck(small_problem):
    value, shapes, starts, locations, weights = op_args(small_problem)
    functional.resolve_backend("cpu", value.device)  # loads the kernel
    args = (value.requires_grad_(), shapes, starts, locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn_forward.default, args)


def test_torch_compile_traces_the_kernel_in_one_graph(small_problem):
    assert_compiled_matches_eager("cpu", small_problem)
