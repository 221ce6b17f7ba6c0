"""The "triton" backend against the independent float64 reference: all four dtypes, the forward and the three
gradients, points outside the map and on its borders, 1x1 levels, odd D, batch 1.

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports them); the interpreter is slow, so the cases are small. Every output is
filled with NaN before the launch, so an element the kernels never write fails the comparison.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from ops import available_backends, functional, ms_deform_attn, triton_backend
from tests.conftest import (
    assert_compiled_matches_eager,
    make_edge_problem,
    make_problem,
    op_args,
    reference_with_grads,
    relative_error,
    run_with_grads,
)

DEVICE = triton_backend.device_type()
REPOSITORY = Path(__file__).resolve().parents[1]

# (levels, batch, queries, heads, channels, points), as in test_ops_functional.py but smaller: the interpreter runs
# every program in Python
CASES = {
    "single_level_batch1_odd_channels": ([(6, 9)], 1, 5, 2, 3, 2),
    "one_by_one_maps": ([(1, 1), (1, 1)], 3, 4, 2, 4, 3),
    "odd_sizes_three_query_blocks": ([(7, 5), (3, 3), (2, 1)], 2, 9, 2, 13, 2),
}


@pytest.fixture(autouse=True)
def poisoned_small_blocks(monkeypatch):
    """NaN-filled outputs, and query blocks of 4 so that 9 queries make three blocks, the last one partial."""
    monkeypatch.setattr(triton_backend, "POISON_OUTPUTS", True)
    monkeypatch.setattr(triton_backend, "MAX_BLOCK_QUERIES", 4)


def test_triton_backend_is_available_in_the_test_setup():
    assert triton_backend.is_available(), "triton imports but neither a GPU nor TRITON_INTERPRET=1 is set"
    assert "triton" in available_backends()


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_float64_forward_and_gradients_match_reference(case):
    problem = make_problem(*CASES[case], device=DEVICE, seed=1)
    output, grads, grad_output = run_with_grads("triton", problem)
    expected, expected_grads = reference_with_grads(problem, grad_output)
    torch.testing.assert_close(output.cpu(), expected, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_triton_samples_on_the_edges_of_the_map_match_reference():
    """Pixel coordinates -1 and the size touch nothing (gradients included), just inside them they do."""
    problem = make_edge_problem(device=DEVICE)
    output, grads, grad_output = run_with_grads("triton", problem)
    expected, expected_grads = reference_with_grads(problem, grad_output)
    torch.testing.assert_close(output.cpu(), expected, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_triton_lower_precision_matches_reference_with_float32_accumulation(dtype, tolerance):
    problem = make_problem([(6, 5), (3, 2)], 2, 7, 2, 16, 3, dtype=dtype, device=DEVICE, seed=2)
    output, grads, grad_output = run_with_grads("triton", problem)
    assert output.dtype == dtype and all(grad.dtype == dtype for grad in grads)
    expected, expected_grads = reference_with_grads(problem, grad_output)  # the same rounded inputs, in float64
    assert relative_error(output, expected) < tolerance
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        assert relative_error(got, want) < 3 * tolerance, f"gradient of {name}"


def test_triton_sample_outside_the_map_contributes_exactly_zero_even_with_infinite_weight():
    problem = make_problem([(4, 5), (2, 3)], 1, 3, 2, 5, 2, device=DEVICE, seed=3)
    problem["sampling_locations"][:, 0] = 2.0  # query 0 samples far outside every level
    problem["attention_weights"][:, 0] = float("inf")
    output, (grad_value, grad_locations, grad_weights), grad_output = run_with_grads("triton", problem)
    assert torch.equal(output[:, 0], torch.zeros_like(output[:, 0]))
    assert torch.equal(grad_locations[:, 0], torch.zeros_like(grad_locations[:, 0]))
    assert torch.equal(grad_weights[:, 0], torch.zeros_like(grad_weights[:, 0]))
    problem["attention_weights"][:, 0] = 0.0  # the other queries against the reference
    expected, expected_grads = reference_with_grads(problem, grad_output)
    torch.testing.assert_close(output.cpu(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_value.cpu(), expected_grads[0], rtol=1e-9, atol=1e-9)


def test_triton_without_queries_gives_an_empty_output_and_zero_gradients():
    problem = make_problem([(3, 4)], 2, 0, 2, 3, 2, device=DEVICE, seed=7)
    output, (grad_value, grad_locations, grad_weights), _ = run_with_grads("triton", problem)
    assert output.shape == (2, 0, 6) and grad_locations.numel() == 0 and grad_weights.numel() == 0
    assert torch.equal(grad_value, torch.zeros_like(grad_value))


def test_triton_non_contiguous_inputs_give_the_contiguous_result():
    problem = make_problem([(3, 4), (1, 2)], 1, 3, 2, 3, 2, device=DEVICE, seed=4)
    value, shapes, starts, locations, weights = op_args(problem)
    strided_value = value.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided_value.is_contiguous()
    expected = ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
    got = ms_deform_attn(strided_value, shapes.int(), starts.int(), locations, weights, backend="triton")
    torch.testing.assert_close(got, expected)


def test_triton_custom_op_rejects_a_layout_the_kernels_cannot_index():
    problem = make_problem([(2, 3)], 1, 2, 2, 3, 1, device=DEVICE, seed=8)
    value, shapes, starts, locations, weights = op_args(problem)
    strided_value = value.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.deformable_detr.ms_deform_attn_triton_forward(strided_value, shapes, starts, locations, weights)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.deformable_detr.ms_deform_attn_triton_forward(value, shapes.int(), starts, locations, weights)


def test_triton_custom_op_registration_passes_opcheck():
    problem = make_problem([(2, 3)], 1, 2, 1, 3, 1, device=DEVICE, seed=5)
    value, shapes, starts, locations, weights = op_args(problem)
    args = (value.requires_grad_(), shapes, starts, locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn_triton_forward.default, args)


def test_triton_torch_compile_traces_the_kernel_in_one_graph():
    assert_compiled_matches_eager("triton", make_problem([(2, 3), (1, 1)], 1, 2, 1, 3, 2, device=DEVICE, seed=6))


def test_triton_on_tensors_of_another_device_is_rejected():
    other = "cuda" if DEVICE == "cpu" else "cpu"
    with pytest.raises(ValueError, match=f"backend 'triton' runs on {DEVICE} tensors.* but value is on {other}"):
        functional.resolve_backend("triton", torch.device(other))


def test_triton_without_the_package_is_not_listed_and_raises_when_asked_for(monkeypatch, small_problem):
    monkeypatch.setattr(triton_backend, "_kernels", lambda: None)
    assert "triton" not in available_backends()
    with pytest.raises(RuntimeError, match="backend 'triton' needs the triton package"):
        ms_deform_attn(*op_args(small_problem), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the compiled kernels are usable")
def test_triton_compiled_for_a_gpu_without_one_is_not_listed_and_says_what_to_do(monkeypatch, small_problem):
    monkeypatch.setattr(triton_backend, "_kernels", lambda: SimpleNamespace(INTERPRETED=False))
    assert "triton" not in available_backends()
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, or TRITON_INTERPRET=1"):
        ms_deform_attn(*op_args(small_problem), backend="triton")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="triton's CUDA compiler ships for Linux")
def test_triton_kernels_compile_for_a_gpu_without_one():
    """The interpreter does not type-check like the GPU compiler: compile both kernels for sm_80 (no launch)."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-m", "tools.triton_compile", "80"],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert len(lines) == 6, completed.stdout
    backward = [line for line in lines if line.startswith("ms_deform_attn_backward_kernel")]
    assert backward and all(re.search(r"(atom|red)\.global[.\w]*add", line) for line in backward), backward


def test_triton_refuses_a_batch_item_too_large_for_int32_offsets():
    value = torch.empty(1, 2**28, 8, 1, device="meta")  # S * M * D = 2^31 elements: one past the int32 range
    shapes = torch.empty(1, 2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="int32"):
        triton_backend._check_layout(value, shapes, shapes[:, 0], value, value)
