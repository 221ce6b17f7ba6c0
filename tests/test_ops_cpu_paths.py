"""The C++ CPU kernel's inner loops, each forced by DETR_MSDA_CPU_KERNEL (read at every call), against the float64
reference: the portable loops every CPU runs, the AVX2 ones (float32 rows of D = 8 k, bfloat16 of D = 16 k) and the
AVX-512 ones (float32 rows of D = 16 k, bfloat16 of D = 32 k) where this build has them (asking for more than the
build has runs the widest it has, and these tests check those again)."""

from __future__ import annotations

import pytest
import torch

from ops import build
from tests.conftest import make_problem, op_args, reference_with_grads, run_with_grads

PATHS = ["auto", "avx512", "avx2", "portable"]
# (levels, batch, queries, heads, channels, points): D = 32 takes the widest loops, D = 48 the AVX2 ones in both
# dtypes and the AVX-512 ones in float32, D = 16 the AVX2 ones in bfloat16 too, D = 12 the portable ones only; odd
# point counts give the backward odd runs of samples
PROBLEMS = {
    "odd_sizes_batch1": ([(7, 5), (3, 3), (2, 1), (1, 1)], 1, 9, 3, 32, 4),
    "model_like_batch2": ([(8, 8), (4, 4), (2, 2), (1, 1)], 2, 11, 8, 32, 4),
    "wide_rows": ([(5, 6), (3, 2)], 1, 5, 2, 48, 3),
    "narrow_rows": ([(6, 5), (3, 3), (1, 2)], 1, 7, 2, 16, 3),
    "portable_rows": ([(4, 3), (2, 2)], 2, 6, 2, 12, 3),
    # the forward works on runs of 32 queries of one head: 89 queries end in a short run in each batch item; the
    # queries sample every row more than once, so the forward reads each head's rows from a contiguous copy
    "encoder_like_runs": ([(9, 7), (5, 4), (3, 2)], 2, 89, 8, 32, 2),
    # few samples for many rows: the forward reads the rows where they are, M * D apart
    "few_queries_in_place": ([(12, 10), (6, 5)], 2, 3, 4, 32, 2),
}
# largest |error| / largest |reference| of each tensor: float32 rounding, bfloat16 inputs with float32 sums
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def worst_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest element-wise error relative to the tensor's scale: a single wrong element shows."""
    want = want.detach()
    return float((got.detach().double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
def test_each_path_matches_the_reference(monkeypatch, path, dtype, problem_name):
    monkeypatch.setenv("DETR_MSDA_CPU_KERNEL", path)
    problem = make_problem(*PROBLEMS[problem_name], dtype=dtype)
    output, grads, grad_output = run_with_grads("cpu", problem)
    assert output.dtype == dtype and all(g.dtype == dtype for g in grads)
    expected, expected_grads = reference_with_grads(problem, grad_output)  # the same rounded inputs, in float64
    assert worst_error(output, expected) < TOLERANCE[dtype]
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        assert worst_error(got, want) < 2 * TOLERANCE[dtype], f"gradient of {name}"


@pytest.mark.parametrize("path", PATHS)
def test_each_path_gives_one_gradient_alone(monkeypatch, path):
    """Asking for the value gradient only, or the location and weight gradients only, gives those of a full
    backward (the kernel drops the work nobody asked for)."""
    monkeypatch.setenv("DETR_MSDA_CPU_KERNEL", path)
    problem = make_problem(*PROBLEMS["odd_sizes_batch1"], dtype=torch.float32)
    from ops import ms_deform_attn

    value, shapes, starts, locations, weights = op_args(problem)
    grad_output = None
    full = None
    for wanted in ((True, True, True), (True, False, False), (False, True, True)):
        leaves = [t.detach().requires_grad_(w) for t, w in zip((value, locations, weights), wanted)]
        output = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend="cpu")
        grad_output = torch.randn_like(output) if grad_output is None else grad_output
        grads = torch.autograd.grad(output, [t for t in leaves if t.requires_grad], grad_output)
        if full is None:
            full = grads
            continue
        expected = [g for g, w in zip(full, wanted) if w]
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
def test_gradcheck_float64_with_the_path_forced(monkeypatch, path):
    """float64 always runs the portable loops; forcing a path must not change that."""
    monkeypatch.setenv("DETR_MSDA_CPU_KERNEL", path)
    from ops import ms_deform_attn

    problem = make_problem([(5, 7), (3, 4), (1, 1)], 1, 4, 2, 32, 3)
    value, shapes, starts, locations, weights = op_args(problem)
    inputs = tuple(t.detach().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w, backend="cpu"), inputs, fast_mode=True
    )


def test_an_unknown_path_is_rejected(monkeypatch):
    monkeypatch.setenv("DETR_MSDA_CPU_KERNEL", "avx1024")
    problem = make_problem(*PROBLEMS["odd_sizes_batch1"], dtype=torch.float32)
    from ops import ms_deform_attn

    with pytest.raises(ValueError, match="DETR_MSDA_CPU_KERNEL must be auto, avx512, avx2 or portable"):
        ms_deform_attn(*op_args(problem), backend="cpu")


def test_the_build_targets_the_widest_vectors_torch_reports():
    capability = torch.backends.cpu.get_cpu_capability()
    flags = build._cpu_vector_flags()
    assert ("-mavx512f" in flags) == (capability == "AVX512")
    assert ("-mavx2" in flags) == (capability in ("AVX2", "AVX512"))
    if "-mavx512bf16" in flags:
        assert torch.cpu._is_avx512_bf16_supported()
