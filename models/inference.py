"""A trained detector prepared once for fast inference: ``prepare_for_inference(model, device, dtype="auto")``.

What it does, in place (the model is for inference only afterwards: its batch norms are gone):

- folds every frozen (or eval-mode) batch norm of the ResNet backbone into the convolution before it;
- converts the weights to bfloat16 where the device multiplies bfloat16 natively (``dtype="auto"``: a CPU that
  torch reports with AVX-512 BF16 or AMX; float32 elsewhere, CUDA included, where ``amp`` covers it);
- keeps in float32 what precision needs: the reference points, the class and box heads, and so every sampling
  location (a bfloat16 coordinate in [0, 1] is only good to 1/256 of the map) and every output box;
- stores the backbone and the input projections channels-last (oneDNN's fast layout; it also makes the
  flattening of the maps into tokens a view);
- runs each ReLU and residual sum of the ResNet blocks, and the bias and ReLU of the transformer's linear layers,
  inside the oneDNN call of the convolution or matrix product before it (:mod:`ops.fused`; the plain ops where
  oneDNN does not run, e.g. on CUDA);
- merges the two projections of each attention's query (``sampling_offsets``, ``attention_weights``) into one
  matrix product (:meth:`ops.MSDeformAttn.merge_query_projections`; the state dict keeps its keys);
- on the CPU, caches the position encodings of the last few padding masks (sizes) seen, and tells the C allocator
  to keep freed memory for reuse (:func:`util.allocator.keep_freed_memory`: the process keeps its peak memory).

``torch.compile`` is not part of it: with frozen weights it made the R50 forward slower, not faster (5x slower at
800x1333, even at 256x320; benchmarks/RESULTS.md).

The images stay float32 (as the data pipeline makes them): the backbone casts them on entry.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ops import MSDeformAttn, fused
from ops.deform_conv import DeformConv2d
from util.allocator import keep_freed_memory

INFERENCE_DTYPES = ("auto", "float32", "bfloat16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Modules of the detector that stay float32 under a bfloat16 model: small, and where positions are computed.
FLOAT32_MODULES = ("class_embed", "bbox_embed", "transformer.reference_points")
POSITION_CACHE_SIZE = 16  # encodings kept: 4 image sizes of a 4-level model


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether the CPU ``device`` multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), as torch reports it at
    run time; False for other devices."""
    if torch.device(device).type != "cpu":
        return False
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_inference_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``"auto"`` -> bfloat16 on a CPU with native bfloat16 (see :func:`native_bfloat16`), else float32;
    ``"float32"`` / ``"bfloat16"`` as named."""
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"inference dtype must be one of {INFERENCE_DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if dtype == "bfloat16":
        warn_if_emulated_bfloat16(device)
    return _DTYPES[dtype]


def warn_if_emulated_bfloat16(device: torch.device | str) -> None:
    """Warn that bfloat16 asked for on a CPU without native bfloat16 (see :func:`native_bfloat16`) runs emulated:
    on a 2-core AVX2 EPYC the R50 forward took 33.7 s in bfloat16 against 3.5 s in float32."""
    if torch.device(device).type == "cpu" and not native_bfloat16(device):
        warnings.warn(
            "bfloat16 asked for on a CPU without native bfloat16 (AVX-512 BF16 or AMX): it runs emulated, several "
            "times slower than float32; 'auto' picks float32 here",
            stacklevel=3,
        )


def _fold_batch_norm(conv: nn.Conv2d | DeformConv2d, norm: nn.Module) -> None:
    """conv's weight and bias absorb ``norm`` (y = (x - mean) / sqrt(var + eps) * weight + bias), in float64."""
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    shift = norm.bias.double() - norm.running_mean.double() * scale
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))


def _foldable(norm: nn.Module) -> bool:
    return isinstance(norm, FrozenBatchNorm2d) or (isinstance(norm, nn.BatchNorm2d) and not norm.training)


# (convolution, batch norm) attribute pairs of torchvision's ResNet stem and blocks, in the order data flows.
_CONV_NORM_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def fold_batch_norms(model: nn.Module) -> int:
    """Fold the batch norms of torchvision ResNet blocks (``convN`` -> ``bnN``, ``downsample[0]`` -> ``[1]``,
    the stem) into their convolutions, replacing each by ``nn.Identity``; returns how many were folded.

    Only these known pairs are folded (a timm backbone's norms are left alone): the data of ``bnN`` is always
    ``convN``'s output there. Batch norms in training mode are left alone too.
    """
    folded = 0
    for module in list(model.modules()):
        pairs = [(module, conv, norm) for conv, norm in _CONV_NORM_PAIRS]
        downsample = getattr(module, "downsample", None)
        if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
            pairs.append((downsample, "0", "1"))
        for owner, conv_name, norm_name in pairs:
            conv, norm = getattr(owner, conv_name, None), getattr(owner, norm_name, None)
            if isinstance(conv, nn.Conv2d | DeformConv2d) and norm is not None and _foldable(norm):
                _fold_batch_norm(conv, norm)
                setattr(owner, norm_name, nn.Identity())
                folded += 1
    return folded


class FusedLinear(nn.Module):
    """The parameters of an ``nn.Linear`` (the same tensors, under the same names) run by :func:`ops.fused.linear`:
    the bias, and with ``relu`` the activation after it, inside one oneDNN matrix product."""

    def __init__(self, linear: nn.Linear, relu: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.relu = linear.in_features, linear.out_features, relu
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)"""
        return fused.linear(x, self.weight, self.bias, relu=self.relu)


class ConvReLU(nn.Conv2d):
    """An ``nn.Conv2d`` with the ReLU after it inside one oneDNN call (:func:`ops.fused.conv2d`): the ResNet stem."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvReLU:
        fused_conv = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )  # fmt: skip
        fused_conv.weight, fused_conv.bias = conv.weight, conv.bias
        return fused_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.conv2d(x, self, relu=True)


class FusedResidualBlock(nn.Module):
    """A torchvision ResNet block (``Bottleneck`` or ``BasicBlock``) whose batch norms were folded, each ReLU and
    the residual sum computed inside the convolution before it (:func:`ops.fused.conv2d`). Its children are the
    block's convolutions and ``downsample``, under their names: the same state-dict keys."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv_names = [name for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
        for name in self.conv_names:
            self.add_module(name, getattr(block, name))
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)"""
        identity = x if self.downsample is None else self.downsample(x)
        *inner, last = [getattr(self, name) for name in self.conv_names]
        for conv in inner:
            x = fused.conv2d(x, conv, relu=True)
        return fused.conv2d(x, last, relu=True, residual=identity)


class FusedEncoderLayer(nn.Module):
    """A :class:`models.deformable_encoder.DeformableEncoderLayer` for inference, the same computation: its children
    (``self_attn``, ``norm1``, ``linear1``, ``linear2``, ``norm2``: the same state-dict keys) run with both residual
    sums inside the matrix products of ``output_proj`` and ``linear2`` (:func:`ops.fused.linear`), the feed-forward
    over blocks of ``FEED_FORWARD_ROWS`` tokens (its (rows, 1024) activation stays in cache instead of an (S, 1024)
    tensor allocated, and paged in, anew in every layer)."""

    FEED_FORWARD_ROWS = 2048

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.self_attn, self.norm1, self.norm2 = layer.self_attn, layer.norm1, layer.norm2
        self.linear1, self.linear2 = layer.linear1, layer.linear2

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """src, pos (N, S, C); reference_points (N, S, L, 2) -> (N, S, C), as the layer it replaces."""
        attention = self.self_attn
        sampled = attention.sample(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask, level_shapes
        )
        src = self.norm1(fused.linear(sampled, attention.output_proj.weight, attention.output_proj.bias, residual=src))
        blocks = src.flatten(0, 1).split(self.FEED_FORWARD_ROWS)
        return torch.cat([self.feed_forward(block) for block in blocks]).view(src.shape)

    def feed_forward(self, src: torch.Tensor) -> torch.Tensor:
        """(rows, C) -> norm2(src + linear2(relu(linear1(src)))) (rows, C)"""
        hidden = fused.linear(src, self.linear1.weight, self.linear1.bias, relu=True)
        return self.norm2(fused.linear(hidden, self.linear2.weight, self.linear2.bias, residual=src))


def _folded_resnet_block(module: nn.Module) -> bool:
    norms = [getattr(module, f"bn{index}", None) for index in (1, 2, 3)]
    return (
        isinstance(module, torchvision.models.resnet.Bottleneck | torchvision.models.resnet.BasicBlock)
        and all(norm is None or isinstance(norm, nn.Identity) for norm in norms)
        and (module.downsample is None or not isinstance(module.downsample[-1], nn.BatchNorm2d | FrozenBatchNorm2d))
    )


def fuse_layers(model: nn.Module) -> int:
    """Put the ReLUs and residual sums of a detector's folded ResNet blocks and stem inside their convolutions, and
    the transformer's linear layers (bias, the feed-forward's ReLU) on :mod:`ops.fused`, in place; returns how many
    modules were replaced, and the encoder's layers by :class:`FusedEncoderLayer`. Modules in
    :data:`FLOAT32_MODULES` and ``nn.MultiheadAttention``'s are left alone."""
    replaced = 0
    body = model.backbone[0].body
    if isinstance(getattr(body, "conv1", None), nn.Conv2d) and isinstance(getattr(body, "bn1", None), nn.Identity):
        body.conv1, body.relu = ConvReLU.from_conv(body.conv1), nn.Identity()
        replaced += 1
    for module in list(model.backbone.modules()):
        for name, child in module.named_children():
            if _folded_resnet_block(child):
                setattr(module, name, FusedResidualBlock(child))
                replaced += 1
    for module in list(model.transformer.modules()):
        if isinstance(module, nn.MultiheadAttention):
            continue
        for name, child in module.named_children():
            if type(child) is not nn.Linear:
                continue
            relu = name == "linear1" and isinstance(getattr(module, "activation", None), nn.ReLU)
            setattr(module, name, FusedLinear(child, relu=relu))
            if relu:
                module.activation = nn.Identity()
            replaced += 1
    layers = model.transformer.encoder.layers
    for index, layer in enumerate(layers):
        layers[index] = FusedEncoderLayer(layer)
    return replaced + len(layers)


def _to_float32(module: nn.Module, args: tuple) -> tuple:
    return tuple(arg.float() if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg for arg in args)


def prepare_for_inference(model: nn.Module, device: torch.device | str, dtype: str = "auto") -> nn.Module:
    """Make the detector ``model`` fast for inference on ``device`` (see the module's docstring), in place.

    Args:
        model: a :class:`models.DeformableDETR`, weights loaded.
        device: where it will run.
        dtype: "auto" (bfloat16 where the CPU has it natively, else float32), "float32" or "bfloat16".

    Returns:
        the model, in eval mode on ``device``; ``model.inference_dtype`` names the
        dtype chosen. Its outputs (``pred_logits``, ``pred_boxes``) are float32 whatever the dtype.
    """
    chosen = resolve_inference_dtype(dtype, device)
    model.eval().to(device)
    fold_batch_norms(model.backbone)
    fuse_layers(model)
    if chosen != torch.float32:
        model.to(chosen)
        for name in FLOAT32_MODULES:
            try:
                kept = model.get_submodule(name)
            except AttributeError:  # e.g. transformer.reference_points in the two-stage variant
                continue
            kept.float()
            called = list(kept) if isinstance(kept, nn.ModuleList) else [kept]  # a shared head is listed repeatedly
            for module in {id(module): module for module in called}.values():
                module.register_forward_pre_hook(_to_float32)
    channels_last = torch.device(device).type == "cpu"
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
        model.input_proj.to(memory_format=torch.channels_last)
    model.backbone[0].set_input_format(chosen, channels_last)
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.merge_query_projections()
    if channels_last:  # the CPU: hashing a mask is cheap there (on a GPU it would wait for the GPU)
        model.backbone.position_encoding.cache_size = POSITION_CACHE_SIZE
        keep_freed_memory()  # large tensors reused from the heap, not paged in anew every forward
    model.inference_dtype = chosen
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
