"""Backbone: levels, strides and channels, DC5, frozen layers, pretrained weights from a file or a clear error."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from models.backbone import build_backbone
from models.position_encoding import PositionEmbeddingSine
from tests.tiny_model import tiny_config


def test_multi_scale_levels_and_masks():
    backbone = build_backbone(tiny_config())
    images = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[:, :, 64:] = True
    features, masks, positions = backbone(images, mask)
    assert backbone.strides == [8, 16, 32] and backbone.num_channels == [128, 256, 512]
    assert [tuple(feature.shape[-2:]) for feature in features] == [(8, 12), (4, 6), (2, 3)]
    assert masks[0][0, 0].tolist() == [False] * 8 + [True] * 4
    assert positions[0].shape == (1, 64, 8, 12)


def test_dc5_halves_the_last_stride():
    backbone = build_backbone(tiny_config("backbone=resnet50", "dilation=true", "num_feature_levels=1"))
    features, _, _ = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert backbone.strides == [16] and features[0].shape == (1, 2048, 4, 4)


def test_stem_and_layer1_are_frozen():
    backbone = build_backbone(tiny_config())
    trainable = {name.split(".")[2] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_lr_backbone_zero_freezes_everything():
    backbone = build_backbone(tiny_config("lr_backbone=0"))
    assert not any(parameter.requires_grad for parameter in backbone.parameters())


def test_pretrained_backbone_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(tiny_config(f"pretrained_backbone={path}"))
    torch.testing.assert_close(backbone[0].body.conv1.weight, reference.conv1.weight)


def test_offline_download_failure_names_the_alternatives(monkeypatch):
    def no_internet(self, *args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_internet)
    with pytest.raises(RuntimeError, match="pretrained_backbone=false"):
        build_backbone(tiny_config("pretrained_backbone=true"))


def test_position_encoding_of_the_image_ignores_padding():
    encoding = PositionEmbeddingSine(16)
    alone = encoding(torch.zeros(1, 5, 7, dtype=torch.bool))
    mask = torch.ones(1, 8, 9, dtype=torch.bool)
    mask[:, :5, :7] = False
    torch.testing.assert_close(encoding(mask)[..., :5, :7], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_size", [0, 2])
def test_position_encoding_from_the_size_alone_is_that_of_an_all_false_mask(dtype, cache_size):
    encoding = PositionEmbeddingSine(16, scale=5.0)
    encoding.cache_size = cache_size
    for batch, height, width in [(1, 1, 1), (2, 5, 7), (3, 31, 17), (2, 5, 7)]:  # the last one again: cached
        features = torch.randn(batch, 3, height, width, dtype=dtype)
        unpadded = encoding.of(features, None)
        assert unpadded.dtype == dtype
        assert torch.equal(unpadded, encoding(torch.zeros(batch, height, width, dtype=torch.bool), dtype))
    assert len(encoding._cache) == min(cache_size, 6)


def test_timm_backbone_gives_strides_8_16_32():
    backbone = build_backbone(tiny_config("backbone=mobilenetv3_small_100"))
    features, masks, _ = backbone(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert backbone.strides == [8, 16, 32]
    assert [feature.shape[1] for feature in features] == backbone.num_channels
    assert [tuple(mask.shape[-2:]) for mask in masks] == [(8, 12), (4, 6), (2, 3)]


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="resnet5O"):
        build_backbone(tiny_config("backbone=resnet5O"))


def test_backbone_from_scratch_trains_batch_norm_and_every_stage():
    backbone = build_backbone(tiny_config("backbone_from_scratch=true"))
    body = backbone[0].body
    assert isinstance(body.bn1, torch.nn.BatchNorm2d) and not isinstance(body.bn1, FrozenBatchNorm2d)
    assert all(parameter.requires_grad for parameter in body.parameters())


def test_backbone_from_scratch_with_pretrained_weights_is_refused():
    with pytest.raises(ValueError, match="backbone_from_scratch=true .* needs pretrained_backbone=false"):
        build_backbone(tiny_config("backbone_from_scratch=true", "pretrained_backbone=true"))
