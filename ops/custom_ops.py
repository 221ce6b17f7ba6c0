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
    "Tensor sampling_locations, Tensor attention_weights, bool[3] output_mask=[True, True, True]) "
    "-> (Tensor, Tensor, Tensor)"
)
# Inference only (no autograd; CPU kernel): the forward from the query's projection (N, Lq, M * L * P * 3) holding
# its sampling offsets (M, L, P, 2) in pixels and attention logits (M, L * P), at 2-d reference points (N, Lq, L, 2).
_library.define(
    "ms_deform_attn_projected_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor reference_points, Tensor projected) -> Tensor"
)
# output_mask says which of (grad_value, grad_sampling_locations, grad_attention_weights) to compute; the kernels
# return a gradient not asked for as an empty tensor of shape (0,) and skip its work.


@torch.library.register_fake(f"{NAMESPACE}::ms_deform_attn_forward")
def forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


@torch.library.register_fake(f"{NAMESPACE}::ms_deform_attn_projected_forward")
def projected_forward_fake(value, spatial_shapes, level_start_index, reference_points, projected):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, projected.shape[1], heads * channels))


@torch.library.register_fake(f"{NAMESPACE}::ms_deform_attn_backward")
def backward_fake(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output_mask=None
):
    mask = (True, True, True) if output_mask is None else tuple(output_mask)
    grads = (value, sampling_locations, attention_weights)
    return tuple(torch.empty_like(g) if wanted else g.new_empty((0,)) for g, wanted in zip(grads, mask))


def save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def backward_through(backward_op, takes_output_mask: bool = False):
    """The autograd formula of a forward op (the five op inputs) whose gradients ``backward_op`` computes.

    With ``takes_output_mask`` the op is told which of (value, sampling_locations, attention_weights) need a
    gradient and skips the others' work; either way a gradient not needed is returned as None.
    """

    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (value, spatial_shapes, level_start_index, sampling_locations, weights)
        mask = [needs[0], needs[3], needs[4]]
        inputs = (grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations)
        grads = (
            backward_op(*inputs, attention_weights, mask)
            if takes_output_mask
            else backward_op(*inputs, attention_weights)
        )
        grads = [grad if wanted else None for grad, wanted in zip(grads, mask)]
        return grads[0], None, None, grads[1], grads[2]

    return backward


def _compiled_backward(*args):
    # looked up at each call, not bound once, so that a test can spy on the op autograd calls
    return torch.ops.deformable_detr.ms_deform_attn_backward(*args)


torch.library.register_autograd(
    f"{NAMESPACE}::ms_deform_attn_forward",
    backward_through(_compiled_backward, takes_output_mask=True),
    setup_context=save_inputs,
)
