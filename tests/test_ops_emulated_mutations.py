"""The emulation catches what a GPU would show: five deliberate defects of the CUDA kernels' source, each a
compile-time switch (``MSDA_MUTATION`` in ``ops/csrc``) that only the tests' mutant build of the emulated kernels
compiles in (one build, cached; ``set_mutation`` picks the defect), must each fail in the emulation, as a wrong
result or as the emulation's own error, while the same build with no defect matches the float64 reference.

Each runs with float64 and sm_80's scalar atomics, and with float32 and sm_90's float4 atomics, on a problem that
gives every defect a chance to show: D = 12 leaves lanes of each group without channels (3 of 4 for float32's
vectors of 4, 2 of 8 for float64's of 2), 9 queries on small maps sample the same pixels, and locations lie on the
right and bottom borders.
"""

from __future__ import annotations

import re

import pytest
import torch

from ops.reference import reference_ms_deform_attn
from tests.conftest import make_problem, op_args
from tools.emulator import emulated_ops

SETTINGS = [(torch.float64, 80), (torch.float32, 90)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
MATCHES = "matches the reference"
MUTATIONS = {
    # forward: the attention weight of the sample in lane k ^ 1 instead of lane k
    "forward_weight_lane": r"^output differs",
    # backward: the value-gradient atomic of corner 3 is not issued
    "drop_corner3_atomic": r"^gradient of value differs",
    # the value gradient's atomicAdd as a plain load and store: a data race on a GPU
    "plain_add": r"data race on grad_value\[\d+\]: thread \d+ of block \d+ .* thread \d+ of block \d+",
    # bilinear.h: the right neighbour counted inside the map up to column W (one past the last)
    "right_border": r"^output differs|outside the tensor its pointer came from",
    # forward: lanes without channels skip the sample before the shuffles, not after
    "owns_before_shuffles": r"differs from the live lanes|different warp-synchronous operations",
}


@pytest.fixture(scope="module")
def mutants():
    ops = emulated_ops(mutants=True)
    yield ops
    ops.set_mutation("none")
    ops.set_architecture(90)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def _outcome(ops, dtype: torch.dtype) -> str:
    """What the emulated forward and backward give on the test problem: MATCHES, the first result that differs
    from the float64 reference, or the emulation's error."""
    problem = make_problem([(5, 7), (3, 2), (1, 1)], 2, 9, 3, 12, 4, dtype=dtype, seed=21)
    names = ("value", "sampling_locations", "attention_weights")
    leaves = [problem[name].detach().double().requires_grad_() for name in names]
    expected = reference_ms_deform_attn(
        leaves[0], problem["spatial_shapes"], problem["level_start_index"], leaves[1], leaves[2]
    )
    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, leaves, grad_output)
    grad_output = grad_output.to(dtype)
    try:
        output = ops.ms_deform_attn_forward(*op_args(problem))
        if not _relative_error(output, expected.detach()) < TOLERANCE[dtype]:
            return "output differs from the reference"
        grads = ops.ms_deform_attn_backward(grad_output, *op_args(problem), [True, True, True])
    except RuntimeError as error:
        return str(error)
    for name, got, want in zip(names, grads, expected_grads):
        if not _relative_error(got, want) < 3 * TOLERANCE[dtype]:
            return f"gradient of {name} differs from the reference"
    return MATCHES


@pytest.mark.parametrize("dtype,sm", SETTINGS, ids=lambda x: str(x).replace("torch.", ""))
def test_mutant_build_without_a_mutation_matches_reference(mutants, dtype, sm):
    mutants.set_mutation("none")
    mutants.set_architecture(sm)
    assert _outcome(mutants, dtype) == MATCHES


@pytest.mark.parametrize("dtype,sm", SETTINGS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_emulation_catches_mutation(mutants, mutation, dtype, sm):
    mutants.set_architecture(sm)
    mutants.set_mutation(mutation)
    try:
        outcome = _outcome(mutants, dtype)
    finally:
        mutants.set_mutation("none")
    assert re.search(MUTATIONS[mutation], outcome), outcome
