"""The comparison with the float64 reference that ``python -m ops.check`` and the first-use self-check
(:mod:`ops.self_check`) share: random problems with points outside the map and on its borders, the forward and the
three gradients of a function against :mod:`ops.reference`, in units of each dtype's tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.reference import reference_ms_deform_attn

# max |backend - reference| / max |reference|, for the output and each gradient (half precision rounds the output
# and the gradients to 8 or 11 bits; the kernels accumulate in float32)
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class CheckProblem:
    level_shapes: tuple[tuple[int, int], ...]
    batch: int
    queries: int
    heads: int
    channels: int
    points: int


def make_check_inputs(
    problem: CheckProblem, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Random inputs with locations over [-0.25, 1.25] (a share outside the map) and a tenth exactly on 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(problem.level_shapes, dtype=torch.int64)
    areas = shapes.prod(1)
    levels = len(problem.level_shapes)
    sizes = (problem.batch, problem.queries, problem.heads, levels, problem.points)
    locations = torch.rand(*sizes, 2, generator=generator, dtype=torch.float64) * 1.5 - 0.25
    on_border = torch.rand(locations.shape, generator=generator) < 0.1
    locations = torch.where(on_border, torch.randint(0, 2, locations.shape, generator=generator).double(), locations)
    floats = {
        "value": torch.randn(problem.batch, int(areas.sum()), problem.heads, problem.channels, generator=generator),
        "sampling_locations": locations,
        "attention_weights": torch.rand(*sizes, generator=generator),
    }
    inputs = {name: tensor.to(device=device, dtype=dtype) for name, tensor in floats.items()}
    inputs["spatial_shapes"] = shapes.to(device)
    inputs["level_start_index"] = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]).to(device)
    return inputs


_FLOATS = ("value", "sampling_locations", "attention_weights")


def _output_and_gradients(function, inputs: dict[str, torch.Tensor], grad_seed: int) -> list[torch.Tensor]:
    leaves = {name: inputs[name].detach().requires_grad_() for name in _FLOATS}
    output = function(
        leaves["value"],
        inputs["spatial_shapes"],
        inputs["level_start_index"],
        leaves["sampling_locations"],
        leaves["attention_weights"],
    )
    grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    gradients = torch.autograd.grad(output, [leaves[name] for name in _FLOATS], grad.to(output))
    return [tensor.detach().double().cpu() for tensor in (output, *gradients)]


QUANTITIES = ("output", "grad value", "grad sampling_locations", "grad attention_weights")


def compare_with_reference(
    function, problem: CheckProblem, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, float]:
    """The error of ``function`` (called as ``ms_deform_attn`` without ``backend``) against the float64 reference
    on ``problem``, per quantity (output and each gradient), in units of the dtype's tolerance (<= 1 passes). The
    reference runs on the same inputs (already rounded to ``dtype``)."""
    inputs = make_check_inputs(problem, device, dtype, seed)
    got = _output_and_gradients(function, inputs, grad_seed=seed)
    expected = _output_and_gradients(reference_ms_deform_attn, inputs, grad_seed=seed)
    errors = {}
    for quantity, actual, reference in zip(QUANTITIES, got, expected):
        scale = reference.abs().max().clamp_min(1e-12)
        errors[quantity] = float((actual - reference).abs().max() / scale) / TOLERANCES[dtype]
    return errors
