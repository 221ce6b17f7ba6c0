"""The CUDA kernels run on the CPU: ``ops/csrc/ms_deform_attn_cuda_kernels.h`` compiled by g++ and launched through
the emulation of ``ops/csrc/cuda_emulation.h`` (every block and thread, warps in lockstep at their shuffles, lanes,
warps and blocks in a seeded random order, every global access checked against the tensor its pointer came from and
for data races, outputs poisoned with NaN before the launch and checked to be written whole), with the value
gradient's atomics of sm_80 (scalar) and of sm_90 (float2/float4 vectors) in every dtype.

No GPU needed: this is the kernel code nvcc compiles, checked against the independent float64 reference on the
cases the other backends run. ``pytest -k emulated`` selects these tests (docs/gpu_verification.md).
"""

from __future__ import annotations

import pytest
import torch

from ops import build, ms_deform_attn
from tests.conftest import make_edge_problem, make_problem, op_args, reference_with_grads
from tests.test_ops_functional import CASES, NONDET_TOL
from tools.emulator import access_counts, emulated_ops, traffic

EMULATED_CASES = {
    **CASES,
    # D = 264: more channel vectors than lanes in every dtype, the kernels' multi-round path
    "wide_channels": ([(3, 4), (2, 2)], 1, 3, 2, 264, 3),
    # a level with no points sampled inside it besides the border
    "many_points_tiny_maps": ([(1, 2), (2, 1), (1, 1)], 2, 3, 1, 8, 9),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# relative error bounds of the output; gradients get 3x (one more rounding of the output gradient)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ARCHITECTURES = [80, 90]  # the value gradient's scalar atomics (sm_80) or vector atomics (sm_90)


@pytest.fixture(scope="module")
def emulated():
    return emulated_ops()


@pytest.fixture(autouse=True)
def _sm90_unless_chosen(emulated):
    """Each test starts on sm_90's atomics, whatever the test before it chose."""
    emulated.set_architecture(90)


@pytest.fixture(params=ARCHITECTURES, ids=lambda sm: f"sm{sm}")
def architecture(emulated, request):
    emulated.set_architecture(request.param)
    return request.param


def _grads_of(op, problem, grad_output, mask=(True, True, True)):
    value, shapes, starts, locations, weights = op_args(problem)
    return op.ms_deform_attn_backward(grad_output, value, shapes, starts, locations, weights, list(mask))


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def _misaligned(tensor: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, one element past a 16-byte boundary."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    shifted = storage[1:].view(tensor.shape)
    shifted.copy_(tensor)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    return shifted


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(EMULATED_CASES))
def test_emulated_cuda_kernels_match_reference(emulated, architecture, case, dtype):
    problem = make_problem(*EMULATED_CASES[case], dtype=dtype, seed=len(case))
    output = emulated.ms_deform_attn_forward(*op_args(problem))
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_output = grad_output.to(dtype)
    expected, expected_grads = reference_with_grads(problem, grad_output)
    assert output.dtype == dtype
    seed = f"emulation seed {emulated.last_seed()}"
    assert _relative_error(output, expected) < TOLERANCE[dtype], seed  # NaN (a poisoned element) fails
    grads = _grads_of(emulated, problem, grad_output)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        seed = f"emulation seed {emulated.last_seed()}"
        assert _relative_error(got, want) < 3 * TOLERANCE[dtype], f"gradient of {name}, {seed}"


def test_emulated_samples_on_the_edges_of_the_map_match_reference(emulated):
    """Pixel coordinates -1 and the size touch nothing (gradients included), just inside them they do."""
    problem = make_edge_problem()
    output = emulated.ms_deform_attn_forward(*op_args(problem))
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected, expected_grads = reference_with_grads(problem, grad_output)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    grads = _grads_of(emulated, problem, grad_output)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_kernels_on_misaligned_tensors_fall_back_to_narrower_loads(emulated, dtype):
    """A value or output gradient off a 16-byte boundary must not be read with 16-byte loads (the emulation
    rejects misaligned accesses): the kernels choose a narrower vector and give the same result, up to the
    rounding of sums taken in other groups (a location gradient is a dot product over channels, which can cancel
    to a small number: its error is measured against the largest gradient)."""
    problem = make_problem(*CASES["model_like"], dtype=dtype, seed=3)
    grad_output = torch.randn(2, 10, 8 * 32, generator=torch.Generator().manual_seed(4), dtype=dtype)
    expected = emulated.ms_deform_attn_forward(*op_args(problem))
    expected_grads = _grads_of(emulated, problem, grad_output)
    shifted = dict(problem, value=_misaligned(problem["value"]))
    torch.testing.assert_close(emulated.ms_deform_attn_forward(*op_args(shifted)), expected)
    relative = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for got, want in zip(_grads_of(emulated, shifted, _misaligned(grad_output)), expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=relative * float(want.abs().max()))


def _emulated_autograd(value, shapes, starts, locations, weights):
    return _EmulatedFunction.apply(value, shapes, starts, locations, weights)


class _EmulatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, shapes, starts, locations, weights):
        ctx.save_for_backward(value, shapes, starts, locations, weights)
        return torch.ops.deformable_detr_emulated.ms_deform_attn_forward(value, shapes, starts, locations, weights)

    @staticmethod
    def backward(ctx, grad_output):
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[3], needs[4]]
        grads = torch.ops.deformable_detr_emulated.ms_deform_attn_backward(
            grad_output.contiguous(), *ctx.saved_tensors, mask
        )
        grads = [grad if wanted else None for grad, wanted in zip(grads, mask)]
        return grads[0], None, None, grads[1], grads[2]


def test_emulated_gradcheck_float64(emulated):
    # smaller than small_problem: every input element costs two emulated launches
    problem = make_problem([(3, 4), (2, 1), (1, 1)], 1, 3, 2, 3, 2, seed=9)
    value, shapes, starts, locations, weights = op_args(problem)
    inputs = tuple(t.detach().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: _emulated_autograd(v, shapes, starts, loc, w), inputs, nondet_tol=NONDET_TOL
    )


def _problem_with_skipped_samples(dtype):
    """Samples wholly outside their map (x = 1.7 or y = -0.6) carry an infinite attention weight."""
    problem = make_problem([(4, 5), (2, 3), (1, 1)], 2, 5, 2, 8, 3, dtype=dtype, seed=11)
    generator = torch.Generator().manual_seed(5)
    skipped = torch.rand(problem["attention_weights"].shape, generator=generator) < 0.3
    locations = problem["sampling_locations"].clone()
    locations[..., 0][skipped] = 1.7
    locations[..., 1][skipped & (torch.rand(skipped.shape, generator=generator) < 0.5)] = -0.6
    finite = problem["attention_weights"].masked_fill(skipped, 0.0)
    infinite = problem["attention_weights"].masked_fill(skipped, float("inf"))
    return (
        problem,
        skipped,
        dict(problem, sampling_locations=locations, attention_weights=finite),
        dict(problem, sampling_locations=locations, attention_weights=infinite),
    )


def _forward_and_grads(backend, problem, grad_output):
    value, shapes, starts, locations, weights = op_args(problem)
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    if backend == "emulated":
        output = _emulated_autograd(leaves[0], shapes, starts, leaves[1], leaves[2])
    else:
        output = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    return output, torch.autograd.grad(output, leaves, grad_output)


@pytest.mark.parametrize("backend", ["emulated", "cpu", "pytorch"])
def test_skipped_sample_contributes_exactly_zero_even_with_an_infinite_weight(emulated, backend):
    _, skipped, finite, infinite = _problem_with_skipped_samples(torch.float64)
    grad_output = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected, expected_grads = _forward_and_grads(backend, finite, grad_output)
    output, grads = _forward_and_grads(backend, infinite, grad_output)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-14)
    grad_value, grad_locations, grad_weights = grads
    torch.testing.assert_close(grad_value, expected_grads[0], rtol=0, atol=1e-14)
    assert torch.all(grad_locations[skipped] == 0) and torch.all(grad_weights[skipped] == 0)
    torch.testing.assert_close(grad_locations, expected_grads[1], rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_weights, expected_grads[2], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kernel", ["emulated", "cpu"])
@pytest.mark.parametrize("mask", [(False, True, True), (True, False, False), (False, False, True)], ids=str)
def test_emulated_and_cpu_backward_skip_gradients_not_asked_for(emulated, kernel, mask):
    if kernel == "cpu":
        build.load_cpu_kernel()
    op = emulated if kernel == "emulated" else torch.ops.deformable_detr
    problem = make_problem(*CASES["odd_sizes_batch3"], dtype=torch.float32, seed=4)
    grad_output = torch.randn(3, 9, 3 * 13, generator=torch.Generator().manual_seed(1))
    full, full_work = _grads_and_work(emulated, op, problem, grad_output, (True, True, True))
    partial, partial_work = _grads_and_work(emulated, op, problem, grad_output, mask)
    for index, (got, want, wanted) in enumerate(zip(partial, full, mask)):
        if wanted and index == 0 and kernel == "emulated":  # atomics in a random order: float32 rounding differs
            torch.testing.assert_close(got, want)
        elif wanted:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            assert got.shape == (0,)  # neither computed nor allocated
    if kernel == "emulated":
        atomics = traffic(partial_work, "atomic").lanes
        assert atomics == (traffic(full_work, "atomic").lanes if mask[0] else 0)  # no value gradient: no atomics
        # no location or weight gradient: no reductions, only the geometry broadcasts
        shuffles, full_shuffles = partial_work["warp_operations"], full_work["warp_operations"]
        assert (shuffles < full_shuffles) == (not (mask[1] or mask[2]))


def _grads_and_work(emulated, op, problem, grad_output, mask):
    """The gradients, and the emulator's counters of what the kernels spent on them (nothing on the CPU kernel)."""
    grads = []
    work = access_counts(lambda: grads.extend(_grads_of(op, problem, grad_output, mask)))
    return grads, work


def test_autograd_asks_the_kernel_for_no_value_gradient_when_value_needs_none(monkeypatch, small_problem):
    build.load_cpu_kernel()
    value, shapes, starts, locations, weights = op_args(small_problem)
    masks = []
    backward_op = torch.ops.deformable_detr.ms_deform_attn_backward

    def spy(*args):
        masks.append(list(args[-1]))
        return backward_op(*args)

    monkeypatch.setattr(torch.ops.deformable_detr, "ms_deform_attn_backward", spy)
    locations = locations.detach().requires_grad_()
    output = ms_deform_attn(value, shapes, starts, locations, weights, backend="cpu")
    (grad_locations,) = torch.autograd.grad(output.sum(), [locations])
    assert masks == [[False, True, False]]
    monkeypatch.undo()
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    full = torch.autograd.grad(ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2]).sum(), leaves)
    torch.testing.assert_close(grad_locations, full[1], rtol=0, atol=0)


def test_emulated_backward_alerts_under_deterministic_algorithms(emulated, small_problem):
    """The atomic value gradient calls alertNotDeterministic (the same host code as the CUDA build); without a
    value gradient there are no atomics and no alert."""
    grad_output = torch.randn(2, 6, 15, dtype=torch.float64)
    with DeterministicAlgorithms():
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward"):
            _grads_of(emulated, small_problem, grad_output)
        _grads_of(emulated, small_problem, grad_output, (False, True, True))


def test_cpu_backward_is_deterministic_across_thread_counts(small_problem):
    """The CPU kernel splits work by value rows and adds into a row in a fixed order: it raises no alert under
    torch.use_deterministic_algorithms(True) and gives bitwise equal results with 1 and 2 threads."""
    build.load_cpu_kernel()
    grad_output = torch.randn(2, 6, 15, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with DeterministicAlgorithms():
            single = _grads_of(torch.ops.deformable_detr, small_problem, grad_output)
        torch.set_num_threads(2)
        double = _grads_of(torch.ops.deformable_detr, small_problem, grad_output)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, double):
        assert torch.equal(a, b)


class DeterministicAlgorithms:
    """torch.use_deterministic_algorithms(True) inside the block, the previous setting after."""

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)


@pytest.mark.parametrize(
    "defect,message",
    [
        ("exited_lane", "differs from the live lanes"),  # a shuffle naming a lane that has exited
        ("divergent_shuffle", "different warp-synchronous operations"),  # a shuffle only half the warp reaches
        # input[64] is output[0] of the same allocation: outside the tensor the pointer came from, though inside
        # another tensor of the launch
        ("past_the_end", r"read of 4 bytes by thread \d+ of block 0 at element 64 of input .64 elements.: outside"),
        ("misaligned", "read of 16 bytes .* at byte 4 of input is misaligned"),
        ("write_race", r"data race on output\[\d+\]: thread \d+ of block 0 writes it and thread \d+ of block 0 wrote"),
        ("read_write_race", r"data race on output\[\d+\]: thread \d+ of block 0 (reads|writes) it and .* (wrote|read)"),
        ("plain_write_among_atomics", r"data race on total\[0\]: .*not both atomically"),
        ("unwritten", r"output output\[37\] was never written"),
        ("raw_pointer", "turned a raw address into a global pointer"),
    ],
)
def test_emulation_catches_what_a_gpu_would_punish(emulated, defect, message):
    values = torch.arange(64, dtype=torch.float32)
    reversed_in_warps = values.view(2, 32).flip(1).flatten()
    torch.testing.assert_close(emulated.run_defect_kernel(values, "none"), reversed_in_warps)  # defect-free
    prefix = r"emulated CUDA kernel defect_kernel \(seed \d+, replay with MSDA_EMULATION_SEED=\d+\): "
    with pytest.raises(RuntimeError, match=prefix + ".*" + message):
        emulated.run_defect_kernel(values, defect)


@pytest.mark.parametrize(
    "channels,element_size,alignment,expected",
    [
        (32, 4, 256, (4, 8)),  # float32: 16-byte loads, 8 lanes of 4 channels
        (32, 2, 256, (8, 4)),  # float16: 8 halves per load
        (32, 8, 256, (2, 16)),  # float64: 2 doubles per load
        (13, 4, 256, (1, 16)),  # odd D: scalar loads
        (6, 4, 256, (2, 4)),  # D = 6: 8-byte loads (3 vectors, rounded up to 4 lanes)
        (32, 4, 260, (1, 32)),  # an address off by one float: scalar loads
        (264, 2, 256, (8, 32)),  # more vectors than lanes: 33 vectors over 32 lanes
    ],
)
def test_emulated_launch_plan_picks_the_widest_aligned_vector(emulated, channels, element_size, alignment, expected):
    vector_width, lanes, blocks = emulated.launch_plan([2, 100, 8, channels, 50, 4, 4], element_size, alignment)
    assert (vector_width, lanes) == expected
    assert blocks == -(-2 * 50 * 8 * lanes // 256)  # one group of lanes per (batch, query, head)


def test_emulated_launch_plan_refuses_a_batch_item_past_int32(emulated):
    with pytest.raises(ValueError, match="indexes one batch item of value"):
        emulated.launch_plan([1, 2**24, 8, 16, 1, 1, 1], 4, 256)  # S * M * D = 2^31
    assert emulated.launch_plan([1, 2**24 - 1, 8, 16, 1, 1, 1], 4, 256)[0] == 4


def test_emulation_seed_fixes_the_order_of_lanes_and_blocks_and_a_new_seed_changes_it(emulated):
    """The order in which atomics add into one value-gradient element follows the seed: the same seed gives the same
    float32 bits, another seed other bits (a 1x1 level makes every query add into the same rows)."""
    problem = make_problem([(3, 4), (1, 1)], 2, 12, 2, 8, 4, dtype=torch.float32, seed=6)
    grad_output = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(2))
    previous = emulated.set_seed(1)
    try:
        first = _grads_of(emulated, problem, grad_output)[0]
        assert emulated.last_seed() == 1
        again = _grads_of(emulated, problem, grad_output)[0]
        emulated.set_seed(2)
        other = _grads_of(emulated, problem, grad_output)[0]
    finally:
        emulated.set_seed(previous)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.testing.assert_close(first, other)


def test_every_output_is_declared_so_the_emulation_poisons_it_and_checks_it_is_written(emulated, small_problem):
    value, shapes, starts, locations, weights = op_args(small_problem)
    emulated.ms_deform_attn_forward(value, shapes, starts, locations, weights)
    assert "output:output" in emulated.last_bindings()
    grad_output = torch.randn(2, 6, 15, dtype=torch.float64)
    emulated.ms_deform_attn_backward(grad_output, value, shapes, starts, locations, weights, [True, True, True])
    bindings = emulated.last_bindings()
    assert {"grad_value:accumulator", "grad_sampling_locations:output", "grad_attention_weights:output"} <= set(
        bindings
    )
    assert all(binding.endswith(":input") for binding in bindings if not binding.startswith("grad_"))


# bytes of a 32-byte sector that one value-gradient atomic instruction of a group fills, for D = 32: every sector
# whole, except with half types on sm_80 (4 lanes of 4-byte scalar atomics fill half of one)
FILLED_SECTOR_BYTES = {(torch.float32, 80): 32, (torch.float32, 90): 32, (torch.float64, 80): 32}
FILLED_SECTOR_BYTES |= {(torch.float64, 90): 32, (torch.bfloat16, 80): 16, (torch.bfloat16, 90): 32}


@pytest.mark.parametrize("dtype,sm", sorted(FILLED_SECTOR_BYTES, key=str), ids=str)
def test_value_gradient_atomics_fill_whole_sectors(emulated, dtype, sm):
    emulated.set_architecture(sm)
    problem = make_problem(*CASES["model_like"], dtype=dtype, seed=8)
    grad_output = torch.randn(2, 10, 8 * 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    atomics = traffic(access_counts(lambda: _grads_of(emulated, problem, grad_output, (True, False, False))), "atomic")
    assert atomics.bytes == FILLED_SECTOR_BYTES[dtype, sm] * atomics.sectors
    width = 4 if (dtype, sm) in {(torch.float32, 90), (torch.bfloat16, 90)} else 1  # float4 atomics on sm_90
    element_size = 8 if dtype == torch.float64 else 4
    assert atomics.bytes == atomics.lanes * width * element_size
