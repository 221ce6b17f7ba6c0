"""The op schemas in torch.library, their fake (meta) implementations and their autograd formula.

The compiled kernels (``ops/csrc``) register CPU and CUDA implementations of these schemas when
:mod:`ops.build` loads them. Defining the schemas here, in Python, makes the ops traceable by ``torch.compile``
(through the fake implementations) whether or not a kernel is built.
"""

from __future__ import annotations

import torch

NAMESPACE = "deformable_detr"

_library = torch.library.Library(NAMESPACE, "DEF")
_library.define(
    "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor"
)
_library.define(
    "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake(f"{NAMESPACE}::ms_deform_attn_forward")
def forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


@torch.library.register_fake(f"{NAMESPACE}::ms_deform_attn_backward")
def backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def backward_through(backward_op):
    """The autograd formula of a forward op (the five op inputs) whose gradients ``backward_op`` computes."""

    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = backward_op(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grad_value, None, None, grad_locations, grad_weights

    return backward


torch.library.register_autograd(
    f"{NAMESPACE}::ms_deform_attn_forward",
    backward_through(torch.ops.deformable_detr.ms_deform_attn_backward),
    setup_context=save_inputs,
)
