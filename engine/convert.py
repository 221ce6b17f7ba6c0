"""``main.py convert``: a Hugging Face hub folder to our checkpoint, or our checkpoint to a hub folder
(the mapping itself is :mod:`models.convert`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from models.convert import convert_from_hf, convert_to_hf
from util.checkpoint import save_checkpoint
from util.config import Config


def convert(cfg: Config, from_hf: str | None, to_hf: str | None, out: str) -> None:
    """``from_hf`` (a hub folder or its weights file) -> the checkpoint ``out``, printing the command that
    evaluates it; or ``to_hf`` (our checkpoint, built with ``cfg``) -> the hub folder ``out``."""
    if from_hf:
        checkpoint, config_file, overrides = convert_from_hf(from_hf)
        path = save_checkpoint(checkpoint, out)
        opts = " ".join([*overrides, f"resume={path}"])
        print(f"wrote {path}\nuse it with: python main.py eval --config {config_file} --opts {opts}")
        return
    path = convert_to_hf(to_hf, dataclasses.replace(cfg, pretrained_backbone=False), out)
    print(f"wrote {Path(out) / 'config.json'} and {path}")
