"""The ResNet-DCN backbone: which convolutions become deformable, pretrained weights, the step-0 features, the
offset predictors' optimizer group and the errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from engine.optim import OFFSET_GROUP, build_optimizer
from models.backbone import build_backbone
from ops.deform_conv import DeformConv2d
from tests.tiny_model import tiny_config
from util.errors import UserError


def deformable_names(backbone) -> list[str]:
    return [name for name, module in backbone[0].body.named_modules() if isinstance(module, DeformConv2d)]


def test_resnet50_stages_3_to_5_deform_every_bottleneck_conv2():
    backbone = build_backbone(tiny_config("backbone=resnet50", "dcn_stages=[3, 4, 5]"))
    expected = [f"layer{stage}.{block}.conv2" for stage, blocks in ((2, 4), (3, 6), (4, 3)) for block in range(blocks)]
    assert deformable_names(backbone) == expected


def test_resnet18_stage_5_deforms_both_convs_of_each_block():
    backbone = build_backbone(tiny_config("dcn_stages=[5]"))
    assert deformable_names(backbone) == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    assert backbone[0].body.layer4[0].conv1.stride == (2, 2)


def features(backbone) -> list[torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        return backbone(images, torch.zeros(1, 64, 80, dtype=torch.bool))[0]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_pretrained_dcn_v1_gives_the_plain_resnet_features_at_step_0(tmp_path, name):
    weights = torchvision.models.get_model(name).state_dict()  # stands in for the ImageNet weights
    path = tmp_path / f"{name}.pth"
    torch.save(weights, path)
    plain = build_backbone(tiny_config(f"backbone={name}", f"pretrained_backbone={path}"))
    deformable = build_backbone(tiny_config(f"backbone={name}", f"pretrained_backbone={path}", "dcn_stages=[3,4,5]"))
    torch.testing.assert_close(deformable[0].body.layer3[0].conv2.weight, weights["layer3.0.conv2.weight"])
    for actual, expected in zip(features(deformable), features(plain), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_pretrained_dcn_v2_starts_at_half_modulation(tmp_path):
    """sigmoid(0) = 0.5 on every tap: the plain ResNet with its deformable convolutions' weights halved."""
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    deformable = build_backbone(tiny_config(f"pretrained_backbone={path}", "dcn_stages=[4,5]", "dcn_modulated=true"))
    halved = build_backbone(tiny_config(f"pretrained_backbone={path}"))
    for name in deformable_names(deformable):
        halved[0].body.get_submodule(name).weight.data.mul_(0.5)
    for actual, expected in zip(features(deformable), features(halved), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_offset_predictors_form_their_own_group_at_lr_backbone_times_lr_offset_mult():
    from models import build_model

    cfg = tiny_config("dcn_stages=[4,5]", "dcn_modulated=true", "lr_backbone=1e-4", "lr_offset_mult=0.1")
    model = build_model(cfg)[0]
    groups = {group["name"]: group for group in build_optimizer(model, cfg).param_groups}
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    offset_names = {names[id(parameter)] for parameter in groups[OFFSET_GROUP]["params"]}
    assert offset_names == {
        name for name, _ in model.named_parameters() if name.startswith("backbone.0.") and ".conv_offset." in name
    }
    assert len(offset_names) == 2 * 8  # weight and bias of the eight 3x3 convolutions of layer3 and layer4
    assert groups[OFFSET_GROUP]["lr"] == pytest.approx(1e-5)
    backbone_names = {names[id(parameter)] for parameter in groups["backbone"]["params"]}
    assert "backbone.0.body.layer4.0.conv1.weight" in backbone_names and not backbone_names & offset_names


def test_without_dcn_there_are_three_groups():
    from models import build_model

    cfg = tiny_config()
    assert [group["name"] for group in build_optimizer(build_model(cfg)[0], cfg).param_groups] == [
        "rest",
        "backbone",
        "linear_proj",
    ]


def test_describe_names_the_deformable_stages():
    from models import build_model
    from models.describe import describe_state_dict

    state_dict = build_model(tiny_config("dcn_stages=[4,5]"))[0].state_dict()
    assert "ResNet-18 with DCN in dcn_stages=[4, 5]" in describe_state_dict(state_dict)


def test_dcn_stages_outside_3_to_5_name_the_key():
    with pytest.raises(UserError, match="dcn_stages \\[2\\]"):
        build_backbone(tiny_config("dcn_stages=[2, 3]"))


def test_dcn_with_a_timm_backbone_is_an_error():
    with pytest.raises(UserError, match="dcn_stages needs a torchvision ResNet"):
        build_backbone(tiny_config("backbone=mobilenetv3_small_100", "dcn_stages=[5]"))
