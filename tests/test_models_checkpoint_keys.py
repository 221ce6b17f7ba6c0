"""Each published variant's state_dict has exactly the original checkpoints' keys, shapes and parameter count."""

from __future__ import annotations

import pytest
import torch

from models import CONFIG_DIR, build_model, published_variant
from models.variants import PUBLISHED_VARIANTS
from util.config import load_config


@pytest.mark.parametrize("variant", [variant.name for variant in PUBLISHED_VARIANTS])
def test_state_dict_matches_reference(reference, variant):
    cfg = load_config(published_variant(variant).config_path, overrides=["pretrained_backbone=false"])
    model, _, _ = build_model(cfg)
    keys = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    expected = reference[variant]
    assert sorted(set(expected["keys"]) - set(keys)) == [], "keys missing"
    assert sorted(set(keys) - set(expected["keys"])) == [], "keys the original does not have"
    assert {name: shape for name, shape in keys.items() if expected["keys"][name] != shape} == {}, "shapes differ"
    assert len(keys) == expected["n_keys"]
    assert sum(parameter.numel() for parameter in model.parameters()) == expected["n_params"]


@pytest.mark.parametrize("variant", ["deformable_detr", "two_stage"])
def test_checkpoint_of_reference_shapes_loads_strictly(reference, variant):
    """A checkpoint as the original code saves it ({"model": state_dict}) loads with strict=True."""
    cfg = load_config(published_variant(variant).config_path, overrides=["pretrained_backbone=false"])
    model, _, _ = build_model(cfg)
    generator = torch.Generator().manual_seed(0)
    checkpoint = {
        "model": {name: torch.randn(shape, generator=generator) for name, shape in reference[variant]["keys"].items()}
    }
    model.load_state_dict(checkpoint["model"], strict=True)
    last = cfg.dec_layers - 1
    torch.testing.assert_close(model.class_embed[last].weight, checkpoint["model"][f"class_embed.{last}.weight"])


def test_heads_are_shared_as_the_original_shares_them():
    base, _, _ = build_model(load_config(CONFIG_DIR / "deformable_detr.yaml", overrides=["pretrained_backbone=false"]))
    assert base.class_embed[0] is base.class_embed[5] and base.bbox_embed[0] is base.bbox_embed[5]
    assert base.transformer.decoder.bbox_embed is None
    two_stage, _, _ = build_model(
        load_config(CONFIG_DIR / "deformable_detr_two_stage.yaml", overrides=["pretrained_backbone=false"])
    )
    assert two_stage.class_embed[0] is not two_stage.class_embed[1]
    assert two_stage.transformer.decoder.class_embed is two_stage.class_embed
    assert two_stage.transformer.decoder.bbox_embed is two_stage.bbox_embed
