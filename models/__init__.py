"""The Deformable DETR detector: ``model, criterion, postprocessors = build_model(cfg)``."""

from __future__ import annotations

from torch import nn

from models.backbone import build_backbone
from models.criterion import SetCriterion, build_criterion
from models.deformable_detr import DeformableDETR
from models.deformable_transformer import build_deformable_transformer
from models.postprocess import PostProcess
from models.variants import CONFIG_DIR, PUBLISHED_VARIANTS, Variant, published_variant
from util.config import Config


def build_model(cfg: Config) -> tuple[DeformableDETR, SetCriterion, dict[str, nn.Module]]:
    """The detector described by ``cfg`` (see ``util.config.Config``), its criterion, and its post-processors
    (``{"bbox": PostProcess}``)."""
    model = DeformableDETR(
        backbone=build_backbone(cfg),
        transformer=build_deformable_transformer(cfg),
        num_classes=cfg.num_classes,
        num_queries=cfg.num_queries,
        num_feature_levels=cfg.num_feature_levels,
        aux_loss=cfg.aux_loss,
    )
    return model, build_criterion(cfg), {"bbox": PostProcess()}


__all__ = [
    "CONFIG_DIR",
    "PUBLISHED_VARIANTS",
    "DeformableDETR",
    "PostProcess",
    "SetCriterion",
    "Variant",
    "build_model",
    "published_variant",
]
