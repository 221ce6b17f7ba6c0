"""What the commands set up alike: the model on this process's device, a checkpoint's weights ready for
inference, and decisions taken on rank 0 and shared."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.amp import resolve_amp
from models import build_model
from models.describe import describe_state_dict
from models.inference import prepare_for_inference
from util.checkpoint import (
    load_checkpoint,
    load_model_weights,
)
from util.config import Config
from util.distributed import (
    DistributedInfo,
    broadcast_from_main,
)
from util.errors import UserError


def say(info: DistributedInfo, message: str) -> None:
    """Print ``message`` on rank 0."""
    if info.is_main:
        print(message, flush=True)


def decided_on_main(info: DistributedInfo, decide: Callable[[], Any]) -> Any:
    """``decide()`` run on rank 0 alone (the rank that reads and writes ``output_dir``); its result, or the
    :class:`UserError` it raised, on every rank."""
    outcome = None
    if info.is_main:
        try:
            outcome = (True, decide())
        except UserError as error:
            outcome = (False, str(error))
    succeeded, value = broadcast_from_main(outcome)
    if not succeeded:
        raise UserError(value)
    return value


def build_model_on(cfg: Config, info: DistributedInfo) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
    """The model on this process's device. No ImageNet weights are fetched when a checkpoint (``resume`` or
    ``finetune_from``) will replace every backbone weight: evaluating a published checkpoint works offline."""
    if cfg.resume or cfg.finetune_from:
        cfg = dataclasses.replace(cfg, pretrained_backbone=False)
    model, criterion, postprocessors = build_model(cfg)
    return model.to(info.device), criterion.to(info.device), postprocessors


def load_for_inference(
    cfg: Config, command: str, model: nn.Module, info: DistributedInfo
) -> tuple[nn.Module, dict, str]:
    """-> (the model with ``cfg.resume``'s weights, prepared for inference in ``cfg.inference_dtype``; the
    checkpoint; the autocast to run it under: ``cfg.amp`` for a float32 model, none for a bfloat16 one, whose
    float32 heads autocast would round)."""
    if not cfg.resume:
        raise UserError(f"{command} needs a checkpoint: --opts resume=PATH")
    checkpoint = load_checkpoint(cfg.resume)
    load_model_weights(model, checkpoint, cfg.resume, describe=describe_state_dict)
    model = prepare_for_inference(model, info.device, cfg.inference_dtype)
    amp = resolve_amp(cfg.amp, info.device) if model.inference_dtype == torch.float32 else "none"
    say(
        info,
        f"{command}: weights in {str(model.inference_dtype).replace('torch.', '')} on {info.device}"
        + (f", autocast {amp}" if amp != "none" else ""),
    )
    return model, checkpoint, amp
