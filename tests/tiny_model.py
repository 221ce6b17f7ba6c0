"""A tiny Deformable DETR config for fast tests: resnet18 without weights, 64 channels, one encoder layer."""

from __future__ import annotations

import torch

from models import CONFIG_DIR
from util.config import Config, load_config

TINY = [
    "pretrained_backbone=false",
    "backbone=resnet18",
    "hidden_dim=64",
    "dim_feedforward=64",
    "nheads=2",
    "enc_layers=1",
    "dec_layers=2",
    "num_queries=8",
    "num_classes=5",
    "dropout=0.0",
]
VARIANTS = {  # name -> the overrides that make it
    "deformable_detr": [],
    "single_scale": ["num_feature_levels=1"],
    "single_scale_dc5": ["num_feature_levels=1", "dilation=true", "backbone=resnet50"],
    "box_refine": ["with_box_refine=true"],
    "two_stage": ["with_box_refine=true", "two_stage=true"],
    "two_stage_without_box_refine": ["two_stage=true"],
}


def tiny_config(*overrides: str) -> Config:
    return load_config(CONFIG_DIR / "deformable_detr.yaml", overrides=[*TINY, *overrides])


def tiny_targets() -> list[dict[str, torch.Tensor]]:
    """Two images: two objects, and none."""
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.3, 0.2, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]


def randomize_zero_initialised(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers (box heads' last layers, sampling offsets, attention weights) random
    weights, so that boxes and sampling depend on the image as in a trained model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
