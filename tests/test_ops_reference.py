"""ops.reference, the float64 reference of python -m ops.check, agrees with the tests' own reference."""

from __future__ import annotations

import pytest
import torch

from ops.reference import reference_ms_deform_attn
from tests.conftest import make_problem
from tests.msda_reference import reference_ms_deform_attn as independent_reference


@pytest.mark.parametrize("seed", range(3))
def test_forward_and_gradients_match_the_independent_reference(seed):
    problem = make_problem([(5, 7), (3, 4), (1, 1)], batch=2, queries=6, heads=3, channels=5, points=4, seed=seed)
    names = ("value", "sampling_locations", "attention_weights")
    ours = [problem[name].clone().requires_grad_() for name in names]
    theirs = [problem[name].clone().requires_grad_() for name in names]
    output = reference_ms_deform_attn(ours[0], problem["spatial_shapes"], problem["level_start_index"], *ours[1:])
    expected = independent_reference(theirs[0], problem["level_shapes"], *theirs[1:])
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(output)
    for got, want in zip(torch.autograd.grad(output, ours, grad), torch.autograd.grad(expected, theirs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
