"""models.describe: a state dict's variant and sizes read from its keys and shapes."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.describe import describe_state_dict
from models.variants import PUBLISHED_VARIANTS
from tests.tiny_training import CONFIG, TINY
from util.config import load_config


def shapes_only(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in keys.items()}


@pytest.mark.parametrize("row", PUBLISHED_VARIANTS, ids=lambda row: row.name)
def test_each_published_checkpoint_is_described_with_its_config(reference, row):
    variant = row.name
    description = describe_state_dict(shapes_only(reference[variant]["keys"]))
    assert f"configs/{row.config}" in description
    assert "ResNet-50" in description and "hidden 256" in description and "91 classes" in description
    assert ("two-stage" if variant == "two_stage" else "one-stage") in description
    assert ("no box refinement" not in description) == (variant in ("box_refine", "two_stage"))
    assert ("1 feature level," in description) == variant.startswith("single_scale")


def test_a_model_of_other_sizes_is_described_without_a_published_config():
    cfg = load_config(CONFIG, overrides=[*TINY, "with_box_refine=true", "num_queries=7"])
    description = describe_state_dict(build_model(cfg)[0].state_dict())
    assert description == ("one-stage, box refinement, 4 feature levels, hidden 32, ResNet-18, 7 queries, 6 classes")
