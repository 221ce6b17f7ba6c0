"""models.deformable_detr.project_extra_level: the extra level's stride-2 convolution is right on narrow maps in
bfloat16, where oneDNN's bfloat16 kernel returns NaN or wrong values (torch 2.9-2.15, the CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.deformable_detr import project_extra_level


def _projection() -> nn.Sequential:
    torch.manual_seed(0)
    projection = nn.Sequential(nn.Conv2d(512, 64, 3, stride=2, padding=1), nn.GroupNorm(32, 64))
    nn.init.normal_(projection[1].weight)
    nn.init.normal_(projection[1].bias)
    return projection.eval()


@pytest.mark.parametrize(("height", "width"), [(3, 1), (3, 2), (7, 2), (5, 3), (4, 6)])
@pytest.mark.parametrize("mode", ["bfloat16 weights", "autocast"])
def test_narrow_maps_in_bfloat16_match_float32(height, width, mode):
    projection = _projection()
    x = torch.randn(4, 512, height, width).bfloat16().float()  # values a bfloat16 tensor holds exactly
    with torch.no_grad():
        expected = projection(x)
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = project_extra_level(projection, x)
        else:
            got = project_extra_level(projection.bfloat16(), x.bfloat16())
    assert got.dtype == torch.bfloat16  # as the projection gives on wider maps, both ways
    assert torch.isfinite(got).all()
    # GroupNorm output of unit scale: bfloat16 weights and rounding leave a few hundredths
    assert (got.float() - expected).abs().max() < 0.1
