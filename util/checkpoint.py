"""Checkpoints written whole or not at all and read without arbitrary unpickling.

A checkpoint is a dict ``{"model", "optimizer", "lr_scheduler", "scaler", "epoch", "config", "category_names",
"log_record"}`` of tensors and plain Python values, so that ``torch.load(..., weights_only=True)`` reads it. The
original implementation's checkpoints also hold ``args``, an ``argparse.Namespace``: that one class is allowed
while loading, nothing else. A file that is not a readable checkpoint, or that holds other objects, raises a
:class:`UserError` that names it and never suggests unpickling it.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from util.atomic_write import atomic_write
from util.errors import UserError

ALLOWED_GLOBALS = [argparse.Namespace]  # the original implementation's ``args``


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """The checkpoint file named by the user does not exist."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` whole or not at all (``util.atomic_write``: a temporary in the same folder,
    fsynced, renamed over ``path``).

    A crash before the rename leaves the previous file at ``path`` untouched. A failed write (a full disk, a
    read-only folder) raises ``util.atomic_write.FileWriteError`` (or ``FileNotWritableError``) naming ``path`` and
    the operating system's reason, with the previous file intact and the temporary removed.
    """
    with atomic_write(path, "wb") as file:
        torch.save(state, file)
    return Path(path)


CHECKPOINT_SOURCES = (
    "a checkpoint written by main.py train (e.g. OUTPUT_DIR/checkpoint.pth) or by the original Deformable DETR code"
)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, read by :func:`load_weights_only`; its ``model`` entry must be a state dict
    (names to tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist: check resume= / finetune_from=")
    checkpoint = load_weights_only(path, map_location)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        keys = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"checkpoint {path} has no 'model' entry (found {keys}); expected {CHECKPOINT_SOURCES}")
    if not is_state_dict(checkpoint["model"]):
        model = checkpoint["model"]
        found = "a mapping holding other values" if isinstance(model, Mapping) else f"a {type(model).__name__}"
        raise UserError(
            f"checkpoint {path}: its 'model' entry is {found}, not a state dict (parameter names to tensors); "
            f"expected {CHECKPOINT_SOURCES}"
        )
    return checkpoint


def is_state_dict(value: Any) -> bool:
    """Whether ``value`` maps names (str) to tensors, as ``nn.Module.state_dict()`` does."""
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items()
    )


def load_weights_only(
    path: Path,
    map_location: str | torch.device = "cpu",
    kind: str = "checkpoint",
    expected: str = CHECKPOINT_SOURCES,
) -> Any:
    """``torch.load(path, weights_only=True)``, ``argparse.Namespace`` allowed (the original implementation's
    ``args``). A file that holds other objects, or is not in PyTorch's format, raises a :class:`UserError` that
    names it as the ``kind`` of file it should be and says to give ``expected``; it never suggests unpickling it."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):  # allowed for this call only
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = unsafe_globals(path, error)
        if refused:
            raise UserError(
                f"{kind} {path} holds objects other than tensors and plain Python values ({', '.join(refused)}) "
                f"and is refused for safety: building them could run code from the file. Give {expected}"
            ) from None
        reason = "its content is not a PyTorch checkpoint"
    except (EOFError, KeyError, RuntimeError, ValueError, AttributeError, IndexError, TypeError) as error:
        reason = "it is empty" if path.stat().st_size == 0 else describe_read_error(error)
    raise UserError(
        f"{path} is not a readable {kind}: {reason}. Give {expected}; if a crash or an interrupted copy cut it "
        "short, copy it again"
    )


def describe_read_error(error: Exception) -> str:
    """Why torch could not read a file, without torch's advice to unpickle it unsafely."""
    if isinstance(error, RuntimeError) and "zip archive" in str(error):
        return "it is truncated or corrupted (its zip archive is incomplete)"
    return f"it is not in PyTorch's format ({type(error).__name__} while reading it)"


def unsafe_globals(path: Path, error: pickle.UnpicklingError) -> list[str]:
    """The classes and functions the checkpoint at ``path`` would need to build, other than the allowed ones
    (from torch's scan of the file, else from the ``error`` that refused one)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError):  # not a zip checkpoint
        found = re.findall(r"Unsupported global: GLOBAL (\S+)", str(error))
    allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in ALLOWED_GLOBALS}
    return [name for name in found if name not in allowed]


def load_model_weights(
    model: torch.nn.Module,
    checkpoint: dict[str, Any],
    source: str | Path = "checkpoint",
    *,
    describe: Callable[[Mapping[str, torch.Tensor]], str] | None = None,
    resizable: tuple[str, ...] = (),
) -> list[str]:
    """Copy ``checkpoint["model"]`` into ``model``: every key and shape must match.

    Tensors inside a module named in ``resizable`` (a component of the key, e.g. ``"class_embed"``) may differ in
    shape: they keep the model's own initialisation and their keys are returned (fine-tuning on other classes).
    Anything else that does not fit raises a ValueError naming the keys and, with ``describe``, what the
    checkpoint and the model each are.
    """
    weights, own = checkpoint["model"], model.state_dict()
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    resized = [key for key in own if key in weights and tuple(weights[key].shape) != tuple(own[key].shape)]
    kept = [key for key in resized if set(key.split(".")) & set(resizable)]
    wrong_shape = [
        f"{key} {tuple(weights[key].shape)} (model {tuple(own[key].shape)})" for key in resized if key not in kept
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            f"{len(items)} {label} {items[:5]}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shapes differ", wrong_shape),
            )
            if items
        ]
        message = f"{source} does not fit this model (check the config it was trained with): " + ", ".join(problems)
        if describe is not None:
            message += f". The checkpoint: {describe(weights)}. This model: {describe(own)}"
        raise UserError(message)
    model.load_state_dict({key: value for key, value in weights.items() if key not in kept}, strict=False)
    return kept


def restore_training_state(
    checkpoint: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
    source: str | Path = "checkpoint",
) -> int:
    """Restore optimizer, scheduler and AMP scaler from ``checkpoint``; returns the next epoch to train.

    The scheduler keeps the step size it has now (the config's ``lr_drop``), so a resumed run can move the drop.
    A checkpoint with model weights alone starts at epoch 0.
    """
    if "optimizer" not in checkpoint or "epoch" not in checkpoint:
        return 0
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:
        raise UserError(
            f"{source}: its optimizer state does not fit this model's parameter groups ({error}); "
            "the model or lr_backbone / lr_linear_proj_names differ from the run that wrote it"
        ) from error
    if "lr_scheduler" in checkpoint:
        step_size = getattr(lr_scheduler, "step_size", None)
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if step_size is not None:
            lr_scheduler.step_size = step_size
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    return int(checkpoint["epoch"]) + 1
