"""Bad input to ms_deform_attn fails in Python with an error naming the argument; kernels never crash."""

from __future__ import annotations

import re

import pytest
import torch

from ops import ms_deform_attn, validation
from tests.conftest import op_args


def _replace(problem: dict, **changes) -> tuple:
    merged = dict(
        zip(
            ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"),
            op_args(problem),
        )
    )
    merged.update(changes)
    return tuple(merged.values())


# name -> (function of the small problem giving changed arguments, error type, message fragment)
BAD_INPUTS = {
    "value_rank": (lambda p: {"value": p["value"][0]}, ValueError, "value must have 4 dimensions"),
    "value_not_tensor": (lambda p: {"value": p["value"].tolist()}, TypeError, "value must be a torch.Tensor"),
    "float_spatial_shapes": (
        lambda p: {"spatial_shapes": p["spatial_shapes"].double()},
        TypeError,
        "spatial_shapes must be an integer tensor",
    ),
    "spatial_shapes_columns": (
        lambda p: {"spatial_shapes": p["spatial_shapes"][:, :1]},
        ValueError,
        "spatial_shapes must be (L, 2)",
    ),
    "shapes_do_not_sum_to_S": (
        lambda p: {"spatial_shapes": p["spatial_shapes"] + torch.tensor([[0, 0], [0, 0], [1, 0]])},
        ValueError,
        "spatial_shapes sums to 49 positions but value has 48",
    ),
    "nonpositive_shape": (
        lambda p: {"spatial_shapes": p["spatial_shapes"] * torch.tensor([[1, 1], [1, -1], [1, 1]])},
        ValueError,
        "spatial_shapes[1] = (3, -4)",
    ),
    "level_start_index_wrong": (
        lambda p: {"level_start_index": torch.tensor([0, 34, 47])},
        ValueError,
        "level_start_index[1] = 34 but the levels before it cover 35",
    ),
    "level_start_index_length": (
        lambda p: {"level_start_index": torch.tensor([0, 35])},
        ValueError,
        "level_start_index has 2 entries but spatial_shapes has 3 levels",
    ),
    "locations_rank": (
        lambda p: {"sampling_locations": p["sampling_locations"][..., 0]},
        ValueError,
        "sampling_locations must have 6 dimensions",
    ),
    "locations_xyz": (
        lambda p: {"sampling_locations": torch.cat([p["sampling_locations"], p["sampling_locations"][..., :1]], -1)},
        ValueError,
        "last dimension must be 2",
    ),
    "locations_batch": (
        lambda p: {"sampling_locations": p["sampling_locations"][:1]},
        ValueError,
        "sampling_locations N (batch) is 1 but value/spatial_shapes give 2",
    ),
    "locations_heads": (
        lambda p: {"sampling_locations": p["sampling_locations"][:, :, :2]},
        ValueError,
        "sampling_locations M (heads) is 2",
    ),
    "locations_levels": (
        lambda p: {"sampling_locations": p["sampling_locations"][:, :, :, :2]},
        ValueError,
        "sampling_locations L (levels) is 2",
    ),
    "weights_points": (
        lambda p: {"attention_weights": p["attention_weights"][..., :3]},
        ValueError,
        "attention_weights must have shape (N, Lq, M, L, P) = (2, 6, 3, 3, 4)",
    ),
    "weights_queries": (
        lambda p: {"attention_weights": p["attention_weights"][:, :5]},
        ValueError,
        "attention_weights must have shape",
    ),
    "integer_locations": (
        lambda p: {"sampling_locations": p["sampling_locations"].long()},
        TypeError,
        "sampling_locations must be a floating tensor",
    ),
    "integer_value": (lambda p: {"value": p["value"].long()}, TypeError, "value must be a floating tensor"),
    "mixed_devices": (
        lambda p: {"attention_weights": p["attention_weights"].to("meta")},
        ValueError,
        "attention_weights is on meta but value is on cpu",
    ),
}


@pytest.mark.parametrize("backend", ["cpu", "pytorch"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case, backend, small_problem):
    make_changes, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=re.escape(message)):
        ms_deform_attn(*_replace(small_problem, **make_changes(small_problem)), backend=backend)


def test_kernel_called_directly_rejects_mismatched_shapes(small_problem):
    ms_deform_attn(*op_args(small_problem), backend="cpu")  # loads the kernel
    value, shapes, starts, locations, weights = op_args(small_problem)
    with pytest.raises(ValueError, match="attention_weights must be"):
        torch.ops.deformable_detr.ms_deform_attn_forward(
            value, shapes, starts, locations, weights[..., :2].contiguous()
        )


def test_kernel_called_directly_never_reads_outside_value(small_problem):
    """A level claimed beyond the end of value is skipped by the kernel instead of read out of bounds."""
    ms_deform_attn(*op_args(small_problem), backend="cpu")
    value, shapes, starts, locations, weights = op_args(small_problem)
    too_large = shapes.clone()
    too_large[2] = torch.tensor([1000, 1000])
    output = torch.ops.deformable_detr.ms_deform_attn_forward(value, too_large, starts, locations, weights)
    without_last_level = weights.clone()
    without_last_level[:, :, :, 2] = 0
    expected = torch.ops.deformable_detr.ms_deform_attn_forward(value, shapes, starts, locations, without_last_level)
    torch.testing.assert_close(output, expected)
    grads = torch.ops.deformable_detr.ms_deform_attn_backward(
        torch.ones_like(output), value, too_large, starts, locations, weights
    )
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["cpu", "deformconv"])
def test_nan_locations_sample_zero_in_the_kernel(small_problem, backend):
    value, shapes, starts, locations, weights = op_args(small_problem)
    locations = locations.clone()
    locations[0, 0] = float("nan")
    output = ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)
    assert torch.isfinite(output).all()
    assert (output[0, 0] == 0).all()


def _count_host_reads(monkeypatch) -> list[tuple[str, tuple]]:
    """Record every ``Tensor.tolist``/``item``/``cpu``: on a GPU each one waits for the device (a host sync)."""
    reads = []
    for method in ("tolist", "item", "cpu"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, _method=method, **kwargs):
            reads.append((_method, tuple(self.shape)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    return reads


@pytest.mark.parametrize("backend", ["cpu", "pytorch"])
def test_twelve_layers_sharing_one_level_layout_read_it_once(monkeypatch, backend, small_problem):
    args = op_args(small_problem)
    reads = _count_host_reads(monkeypatch)
    for _ in range(12):  # a detector forward: 6 encoder and 6 decoder layers, the same layout tensors
        ms_deform_attn(*args, backend=backend)
    assert len(reads) == 1


def test_layout_changed_in_place_is_checked_again(small_problem):
    args = op_args(small_problem)
    ms_deform_attn(*args, backend="cpu")
    small_problem["level_start_index"][1] += 1  # the same tensor object, a new version
    with pytest.raises(ValueError, match=re.escape("level_start_index[1] = 36 but the levels before it cover 35")):
        ms_deform_attn(*args, backend="cpu")


def test_new_layout_tensors_with_the_same_values_are_read_again(monkeypatch, small_problem):
    args = op_args(small_problem)
    ms_deform_attn(*args, backend="cpu")
    reads = _count_host_reads(monkeypatch)
    fresh = (args[0], args[1].clone(), args[2].clone(), *args[3:])  # as a detector builds them every forward
    ms_deform_attn(*fresh, backend="cpu")
    assert len(reads) == 1


def test_no_host_read_while_a_cuda_graph_is_captured(monkeypatch, small_problem):
    args = op_args(small_problem)
    expected = ms_deform_attn(*(args[0], args[1].clone(), args[2].clone(), *args[3:]), backend="cpu")
    monkeypatch.setattr(validation, "_capturing_cuda_graph", lambda device: True)  # no GPU here: pretend
    reads = _count_host_reads(monkeypatch)
    output = ms_deform_attn(*args, backend="cpu")  # layout tensors never checked before: the check is skipped
    assert reads == []
    torch.testing.assert_close(output, expected)
