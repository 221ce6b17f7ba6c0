"""One training epoch: forward (optionally under autocast), set criterion, backward, clipping, AdamW step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import Batch
from models.inference import native_bfloat16
from util.distributed import all_reduce_mean, is_main_process
from util.errors import RunError
from util.progress import Progress

AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHOWN = ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr")


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; training stops before the step that would spread it to the weights."""


def resolve_amp(amp: str, device: torch.device) -> str:
    """The config's ``amp`` for ``device``: ``"auto"`` is ``"bfloat16"`` on a CPU that multiplies bfloat16 natively
    (``models.inference.native_bfloat16``) and ``"none"`` elsewhere; other values as they are."""
    if amp != "auto":
        return amp
    return "bfloat16" if native_bfloat16(device) else "none"


def prepare_for_training(model: nn.Module, amp: str, device: torch.device) -> None:
    """Under bfloat16 autocast on the CPU, store the backbone and input projections channels-last, in place: there
    oneDNN runs the convolutions and their gradients several times faster than in the default layout (in float32
    channels-last is slower, so it is left alone)."""
    if amp == "bfloat16" and device.type == "cpu":
        model.backbone.to(memory_format=torch.channels_last)
        model.input_proj.to(memory_format=torch.channels_last)
        model.backbone[0].set_input_format(None, channels_last=True)


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype named by the config's ``amp`` (None for ``"none"``)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[amp]


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


def forward_losses(
    model: nn.Module, criterion: nn.Module, batch: Batch, dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model on ``batch`` (under autocast to ``dtype``, None: none), the criterion on its float32 outputs:
    -> (every loss of the criterion, the weighted total)."""
    with torch.autocast(batch.images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = model(batch.images, batch.padding_mask)
    losses = criterion(to_float32(outputs), batch.targets)
    return losses, criterion.total_loss(losses)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    *,
    clip_max_norm: float = 0.0,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    print_every: int = 10,
) -> dict[str, float]:
    """Train ``model`` on every batch of ``loader`` once.

    Returns the epoch's averages over this process's batches, then over processes: ``loss`` (the weighted
    total) and every loss of ``criterion`` unweighted (``loss_ce``, ``loss_bbox_0``, ``class_error``, ...).
    Raises :class:`NonFiniteLossError` (on every rank alike) when the total loss is not finite, before the
    optimizer step.
    """
    model.train()
    criterion.train()
    dtype = autocast_dtype(amp)
    scaler = scaler if scaler is not None else build_grad_scaler("none", device)
    progress = Progress(len(loader), header=f"epoch {epoch}", every=print_every, enabled=is_main_process(), shown=SHOWN)
    for iteration, batch in enumerate(loader):
        batch: Batch = batch.to(device, non_blocking=True)
        losses, loss = forward_losses(model, criterion, batch, dtype)
        total = all_reduce_mean(loss.detach().reshape(1)).item()
        if not math.isfinite(total):
            shown = ", ".join(f"{name} {value.item():.4g}" for name, value in losses.items() if name in SHOWN)
            raise NonFiniteLossError(
                f"epoch {epoch}, iteration {iteration}: the loss is {total} ({shown}); "
                "training stopped before the optimizer step"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        progress.step(
            loss=loss.item(),
            **{name: value.item() for name, value in losses.items()},
            lr=optimizer.param_groups[0]["lr"],
        )
    progress.close()
    averages = {name: value for name, value in progress.averages().items() if name != "lr"}
    return _mean_over_processes(averages, device)


def _mean_over_processes(averages: dict[str, float], device: torch.device) -> dict[str, float]:
    names = sorted(averages)
    values = all_reduce_mean(torch.tensor([averages[name] for name in names], dtype=torch.float64, device=device))
    return dict(zip(names, values.tolist()))
