"""Mixed precision, as the config's ``amp`` names it (``"none"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``): the
autocast a forward runs under, the gradient scaler, and the memory layout bfloat16 training wants on the CPU.
Training, evaluation and prediction share it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.inference import native_bfloat16, warn_if_emulated_bfloat16

AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_amp(amp: str, device: torch.device) -> str:
    """The config's ``amp`` for ``device``: ``"auto"`` is ``"bfloat16"`` on a CPU that multiplies bfloat16 natively
    (``models.inference.native_bfloat16``) and ``"none"`` elsewhere; other values as they are."""
    if amp == "bfloat16":
        warn_if_emulated_bfloat16(device)
    if amp != "auto":
        return amp
    return "bfloat16" if native_bfloat16(device) else "none"


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype named by the config's ``amp`` (None for ``"none"``)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[amp]


def autocast(amp: str, device: torch.device) -> torch.autocast:
    """The autocast context for ``amp`` (resolved, not ``"auto"``) on ``device``; ``"none"`` disables it."""
    dtype = autocast_dtype(amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def build_grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for float16 only (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(amp) is torch.float16)


def to_float32(outputs: Any) -> Any:
    """``outputs`` (nested dicts and lists of tensors) with floating tensors in float32, for the losses."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(value) for value in outputs)
    return outputs


def prepare_for_training(model: nn.Module, amp: str, device: torch.device) -> None:
    """Under bfloat16 autocast on the CPU, store the backbone and input projections channels-last, in place: there
    oneDNN runs the convolutions and their gradients several times faster than in the default layout (in float32
    channels-last is slower, so it is left alone)."""
    if amp == "bfloat16" and device.type == "cpu":
        model.backbone.to(memory_format=torch.channels_last)
        model.input_proj.to(memory_format=torch.channels_last)
        model.backbone[0].set_input_format(None, channels_last=True)
