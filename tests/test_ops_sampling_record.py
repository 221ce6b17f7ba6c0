"""ops.record_sampling: the recorded locations, weights, offsets and masks are exactly those the ops sampled with;
records are keyed by module name, detached; the recorders leave on exit (also on an error) and blocks do not nest."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ops import (
    AttentionSampling,
    DeformConv2d,
    DeformPSRoIPool,
    DeformRoIPool,
    MSDeformAttn,
    OffsetSampling,
    deform_conv2d,
    deform_ps_roi_pool,
    deform_roi_pool,
    ms_deform_attn,
    record_sampling,
)
from tests.test_ops_module import LEVEL_SHAPES, _inputs, _module


def _padding_mask(inputs: dict) -> torch.Tensor:
    mask = torch.zeros(2, inputs["input_flatten"].shape[1], dtype=torch.bool)
    mask[1, 30:] = True
    return mask


def _attention_output_before_projection(module: MSDeformAttn, inputs: dict) -> tuple[torch.Tensor, list]:
    """What ``ms_deform_attn`` returned inside ``module`` (the input of ``output_proj``), and the records."""
    caught = {}
    handle = module.output_proj.register_forward_pre_hook(lambda _, args: caught.update(sampled=args[0]))
    try:
        with record_sampling(module) as records:
            module(**inputs)
    finally:
        handle.remove()
    return caught["sampled"], records[""]


@pytest.mark.parametrize("reference", ["points", "boxes"])
def test_recorded_locations_and_weights_are_those_the_op_sampled_with(reference):
    module = _module()
    inputs = _inputs()
    if reference == "boxes":
        inputs["reference_points"] = torch.cat([inputs["reference_points"], torch.rand(2, 5, 3, 2) * 0.3], -1)
    inputs["input_padding_mask"] = _padding_mask(inputs)
    sampled, (record,) = _attention_output_before_projection(module, inputs)
    value = module.value_proj(inputs["input_flatten"]).masked_fill(inputs["input_padding_mask"][..., None], 0.0)
    again = ms_deform_attn(
        value.view(2, -1, 4, 4),
        record.spatial_shapes,
        record.level_start_index,
        record.sampling_locations,
        record.attention_weights,
        backend=module.backend,
    )
    assert torch.equal(again, sampled)


def test_record_holds_the_inputs_the_module_sampled_around():
    module = _module()
    inputs = _inputs()
    inputs["input_padding_mask"] = _padding_mask(inputs)
    _, (record,) = _attention_output_before_projection(module, inputs)
    assert isinstance(record, AttentionSampling)
    assert record.sampling_locations.shape == (2, 5, 4, 3, 3, 2)
    assert record.attention_weights.shape == (2, 5, 4, 3, 3)
    assert torch.equal(record.reference_points, inputs["reference_points"])
    assert torch.equal(record.spatial_shapes, torch.tensor(LEVEL_SHAPES))
    assert torch.equal(record.level_start_index, inputs["input_level_start_index"])
    assert torch.equal(record.padding_mask, inputs["input_padding_mask"])


def test_records_are_detached_and_gradients_still_flow():
    module = _module()
    inputs = _inputs()
    inputs["query"].requires_grad_()
    with record_sampling(module) as records:
        module(**inputs).sum().backward()
    (record,) = records[""]
    assert not record.sampling_locations.requires_grad and not record.attention_weights.requires_grad
    assert inputs["query"].grad is not None and module.sampling_offsets.weight.grad.abs().sum() > 0


class _TwoAttentions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = _module(), _module()

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.second(**dict(inputs, query=self.first(**inputs)))


def test_records_are_keyed_by_name_in_forward_order_one_per_forward():
    model = _TwoAttentions()
    with record_sampling(model) as records:
        model(_inputs())
        model(_inputs(seed=1))
    assert list(records) == ["first", "second"]
    assert [len(forwards) for forwards in records.values()] == [2, 2]
    assert not torch.equal(records["first"][0].sampling_locations, records["first"][1].sampling_locations)


def test_recorders_leave_on_exit_and_nothing_is_recorded_after():
    model = _TwoAttentions()
    with record_sampling(model) as records:
        model(_inputs())
    model(_inputs())
    assert [len(forwards) for forwards in records.values()] == [1, 1]
    assert all("sampling_recorder" not in module.__dict__ for module in (model.first, model.second))
    assert model.first.sampling_recorder is None


def test_recorders_leave_on_an_error():
    model = _TwoAttentions()
    with pytest.raises(ValueError, match="reference_points"), record_sampling(model):
        model(dict(_inputs(), reference_points=torch.rand(2, 5, 3, 3)))
    assert model.first.sampling_recorder is None and model.second.sampling_recorder is None


def test_nested_blocks_are_refused_and_leave_the_outer_recording():
    model = _TwoAttentions()
    with record_sampling(model) as records:
        with pytest.raises(RuntimeError, match="cannot nest"), record_sampling(model.first):
            pass
        model(_inputs())
    assert list(records) == ["first", "second"]


def test_outputs_are_the_same_within_the_block():
    module = _module()
    inputs = _inputs()
    with record_sampling(module):
        recorded = module(**inputs)
    assert torch.equal(recorded, module(**inputs))


@pytest.mark.parametrize("modulated", [False, True])
def test_deform_conv_records_the_offsets_and_masks_it_convolved_with(modulated):
    torch.manual_seed(0)
    conv = DeformConv2d(4, 6, 3, stride=2, padding=1, offset_groups=2, modulated=modulated)
    nn.init.normal_(conv.conv_offset.weight, std=0.3)
    features = torch.randn(2, 4, 9, 8)
    with record_sampling(conv) as records:
        output = conv(features)
    (record,) = records[""]
    assert isinstance(record, OffsetSampling) and record.input_size == (9, 8)
    assert record.offset.shape == (2, 2 * 2 * 9, 5, 4)
    assert (record.mask is None) == (not modulated)
    expected = deform_conv2d(
        features, record.offset, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, record.mask
    )
    assert torch.equal(output, expected)


@pytest.mark.parametrize("module_class", [DeformRoIPool, DeformPSRoIPool])
def test_roi_pools_record_the_offsets_and_masks_they_pooled_with(module_class):
    torch.manual_seed(0)
    position_sensitive = module_class is DeformPSRoIPool
    input = torch.randn(2, 3 * (4 if position_sensitive else 1), 9, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 7.0], [1, 0.0, 2.0, 8.0, 8.0]])
    module = module_class(input.shape[1], output_size=2, spatial_scale=0.5, sampling_ratio=2, modulated=True)
    predictor = module.offset_conv if position_sensitive else module.offset_fc
    nn.init.normal_(predictor.weight, std=0.3)
    with record_sampling(module) as records:
        output = module(input, rois)
    (record,) = records[""]
    assert record.offset.shape == (2, 2, 2, 2) and record.mask.shape == (2, 1, 2, 2)
    assert record.offset.abs().max() > 0 and record.input_size == (9, 8)
    pool = deform_ps_roi_pool if position_sensitive else deform_roi_pool
    expected = pool(input, rois, record.offset, record.mask, 2, 0.5, 2)
    assert torch.equal(output, expected)
