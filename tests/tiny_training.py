"""A tiny training run for the engine tests: a few 64-pixel shapes images shown at 80 pixels (so that the
smallest feature level keeps 2x2 positions: GroupNorm over 32 groups of 32 channels needs more than one) and a
32-channel model."""

from __future__ import annotations

from pathlib import Path

import torch

import main
from datasets import Batch
from datasets.shapes import generate_shapes_dataset
from util.config import Config, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "deformable_detr.yaml"
TINY = [
    "device=cpu",
    "pretrained_backbone=false",
    "backbone=resnet18",
    "lr_backbone=0",
    "hidden_dim=32",
    "dim_feedforward=32",
    "nheads=2",
    "enc_layers=1",
    "dec_layers=1",
    "num_queries=10",
    "num_classes=6",
    "dropout=0.0",
    "attention_backend=pytorch",
    "batch_size=2",
    "epochs=1",
    "lr_drop=10",
    "num_workers=0",
    "train_scales=[80]",
    "max_size=96",
    "train_crop=false",
    "val_size=80",
    "print_every=1",
    "save_every=1",
]
# 5 validation images: two processes get 3 each, one image twice.
NUM_TRAIN, NUM_VAL = 4, 5


def make_shapes(root: Path) -> Path:
    """The tiny shapes set under ``root`` (COCO layout)."""
    return generate_shapes_dataset(root, NUM_TRAIN, NUM_VAL, seed=0, size=64)


def tiny_overrides(coco_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"coco_path={coco_path}", f"output_dir={output_dir}", *extra]


def run_main(*command: str, opts: list[str]) -> int:
    """``main.py COMMAND --config configs/deformable_detr.yaml --opts OPTS`` in this process; its exit status."""
    return main.main([*command, "--config", str(CONFIG), "--opts", *opts])


def tiny_training_config(coco_path: Path, output_dir: Path, *extra: str) -> Config:
    return load_config(CONFIG, overrides=tiny_overrides(coco_path, output_dir, *extra))


def tiny_batches(count: int = 2) -> list[Batch]:
    """``count`` batches of two random 64-pixel images: one with two boxes, one with none."""
    generator = torch.Generator().manual_seed(0)
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    return [
        Batch(torch.randn(2, 3, 64, 64, generator=generator), torch.zeros(2, 64, 64, dtype=torch.bool), targets)
        for _ in range(count)
    ]
