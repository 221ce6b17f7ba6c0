"""models.inference: batch-norm folding, the dtype choice, and the bfloat16 model's detections against float32's."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import ops.module
from engine.amp import resolve_amp
from models import build_model
from models.backbone import make_deformable
from models.inference import fold_batch_norms, prepare_for_inference, resolve_inference_dtype
from ops.deform_conv import DeformConv2d
from tests.tiny_model import randomize_zero_initialised, tiny_config


def _randomize_offsets(model: nn.Module) -> None:
    """Deformable convolutions whose offsets and masks depend on the image (they start at zero)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, DeformConv2d):
            weight = module.conv_offset.weight
            weight.data.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * 0.01)


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Batch norms with statistics and affine terms far from the identity, so that folding has work to do."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d | nn.BatchNorm2d):
            size = module.weight.shape
            for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -1, 1)):
                values = torch.rand(size, generator=generator, dtype=torch.float64) * (high - low) + low
                getattr(module, name).data.copy_(values)
            module.running_var.data.copy_(torch.rand(size, generator=generator, dtype=torch.float64) * 2 + 0.1)


@pytest.mark.parametrize(
    ("name", "norm", "expected"),
    [("resnet18", FrozenBatchNorm2d, 20), ("resnet50", FrozenBatchNorm2d, 53), ("resnet18", nn.BatchNorm2d, 20)],
)
def test_folding_batch_norms_keeps_the_outputs(name: str, norm: type, expected: int) -> None:
    torch.manual_seed(0)
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm).double().eval()
    _randomize_norms(resnet)
    images = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    before = resnet(images)
    assert fold_batch_norms(resnet) == expected
    assert not any(isinstance(module, FrozenBatchNorm2d | nn.BatchNorm2d) for module in resnet.modules())
    torch.testing.assert_close(resnet(images), before, rtol=1e-10, atol=1e-10)


def test_folding_also_takes_deformable_convolutions_and_leaves_training_norms() -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d).double().eval()
    make_deformable(resnet, [5], modulated=True)
    _randomize_norms(resnet)
    _randomize_offsets(resnet)
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    before = resnet(images)
    assert fold_batch_norms(resnet) == 20
    torch.testing.assert_close(resnet(images), before, rtol=1e-9, atol=1e-9)

    training = torchvision.models.resnet18(weights=None).train()
    assert fold_batch_norms(training) == 0  # batch statistics: nothing to fold


def test_auto_dtype_follows_what_torch_reports_about_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for bf16, amx, expected in (
        (False, False, torch.float32),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
    ):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        assert resolve_inference_dtype("auto", "cpu") == expected
    assert resolve_inference_dtype("auto", "cuda") == torch.float32
    assert resolve_inference_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="inference dtype must be one of"):
        resolve_inference_dtype("float16", "cpu")


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_asked_for_without_native_bfloat16_warns(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """bfloat16 named where the CPU emulates it (an AVX2 EPYC: 10x slower than float32) warns, for inference and
    for training's amp; where the CPU has it, or under "auto", nothing is said."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    calls = (lambda: resolve_inference_dtype("bfloat16", "cpu"), lambda: resolve_amp("bfloat16", torch.device("cpu")))
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [str(w.message).startswith("bfloat16 asked for on a CPU without native") for w in caught] == (
            [] if native else [True]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_inference_dtype("auto", "cpu")
        resolve_amp("auto", torch.device("cpu"))


VARIANTS = {
    "deformable_detr": [],
    "box_refine": ["with_box_refine=true"],
    "two_stage": ["with_box_refine=true", "two_stage=true"],
    "dcn": ["dcn_stages=[4,5]", "dcn_modulated=true"],
}


def _model_pair(overrides: list[str]) -> tuple[nn.Module, nn.Module]:
    """A fixed random-weight tiny model (no zero-initialised layers, batch norms with random statistics) in
    float32, and a copy prepared in bfloat16."""
    torch.manual_seed(0)
    model = build_model(tiny_config("num_queries=30", *overrides))[0].eval()
    randomize_zero_initialised(model)
    _randomize_norms(model)
    _randomize_offsets(model)
    generator = torch.Generator().manual_seed(2)
    for head in model.class_embed:  # scores spread over (0, 1) instead of all near the 0.01 prior
        head.weight.data.copy_(torch.randn(head.weight.shape, generator=generator) * 0.1)
        head.bias.data.zero_()
    fast = prepare_for_inference(copy.deepcopy(model), "cpu", dtype="bfloat16")
    return model, fast


def _top_detections(outputs: dict, count: int) -> list[list[tuple[float, int, torch.Tensor]]]:
    """Per image, the ``count`` best (score, label, box) over queries x classes, as the post-processing ranks them."""
    scores = outputs["pred_logits"].sigmoid().flatten(1)  # (B, Q * C)
    classes = outputs["pred_logits"].shape[-1]
    best = scores.topk(count, dim=1)
    return [
        [
            (float(score), int(index) % classes, outputs["pred_boxes"][image, int(index) // classes])
            for score, index in zip(values, indices)
        ]
        for image, (values, indices) in enumerate(zip(best.values, best.indices))
    ]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bfloat16_detections_match_float32(variant: str) -> None:
    """float32's ten best detections per image are found by the bfloat16 model too: the same label, the box within
    0.02 of the image size, the score within 0.02.

    Why 0.02: the box heads and reference points run in float32, but they read bfloat16 hidden states (8 bits of
    mantissa: every layer rounds its output by up to 2^-9 relative, and the errors of the ~20 layers add up to a
    few tenths of a percent of a hidden state); a box coordinate is a sigmoid (slope <= 1/4) of a logit the head
    computes from them, so even a 5% error of a logit of size 1 moves it by ~0.012; a score, a sigmoid too, as
    much. Detections are matched by label and box rather than by query: two-stage picks its queries by the
    encoder's scores, and a near tie may order them differently. Where queries are fixed, each query's boxes are
    compared directly too.
    """
    model, fast = _model_pair(VARIANTS[variant])
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True  # the second image is padded on the right
    with torch.no_grad():
        expected, got = model(images, mask), fast(images, mask)
    assert got["pred_logits"].dtype == got["pred_boxes"].dtype == torch.float32
    # two-stage: every encoder pixel's proposal (a fixed order) must agree; the decoder's queries are the top 30
    # proposals, so a near tie at the 30th may swap one: there only the five best detections must match.
    if model.two_stage:
        compared, count = (expected["enc_outputs"], got["enc_outputs"]), 5
    else:
        compared, count = (expected, got), 10
    box_error = (compared[1]["pred_boxes"] - compared[0]["pred_boxes"]).abs().max()
    assert box_error < 0.02, f"boxes of the same queries differ by up to {box_error:.4f}"
    score_error = (compared[1]["pred_logits"].sigmoid() - compared[0]["pred_logits"].sigmoid()).abs().max()
    assert score_error < 0.02, f"scores of the same queries differ by up to {score_error:.4f}"
    candidates = _top_detections(got, got["pred_logits"][0].numel())  # all of them
    for image, wanted in enumerate(_top_detections(expected, count)):
        for score, label, box in wanted:
            found = [
                (other_box - box).abs().max()
                for other_score, other_label, other_box in candidates[image]
                if other_label == label and abs(other_score - score) < 0.02
            ]
            assert found and min(found) < 0.02, (
                f"image {image}: no match for label {label}, score {score:.3f}, box {box}"
            )


@pytest.mark.parametrize("options", [[], ["with_box_refine=true"]])
def test_bfloat16_model_keeps_sampling_locations_in_float32(monkeypatch: pytest.MonkeyPatch, options) -> None:
    """Each attention samples a bfloat16 value where float32 numbers say: locations and weights in float32
    (box references, or a recording), or float32 reference points from which the kernel computes them (2-d
    references)."""
    _, fast = _model_pair(options)
    seen = []
    original, original_projected = ops.module.ms_deform_attn, ops.module.ms_deform_attn_projected

    def spy(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **kwargs):
        seen.append(("locations", value.dtype, sampling_locations.dtype, attention_weights.dtype))
        return original(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **kwargs)

    def spy_projected(value, spatial_shapes, level_start_index, reference_points, projected):
        seen.append(("projected", value.dtype, reference_points.dtype))
        return original_projected(value, spatial_shapes, level_start_index, reference_points, projected)

    monkeypatch.setattr(ops.module, "ms_deform_attn", spy)
    monkeypatch.setattr(ops.module, "ms_deform_attn_projected", spy_projected)
    with torch.no_grad():
        fast(torch.randn(1, 3, 64, 64))
    assert len(seen) == 3  # one encoder and two decoder layers
    points = ("projected", torch.bfloat16, torch.float32)
    boxes = ("locations", torch.bfloat16, torch.float32, torch.float32)
    # with box refinement the first decoder layer starts from 2-d points, the second from the refined boxes
    assert seen == ([points, points, boxes] if options else [points] * 3), seen
    assert fast.inference_dtype == torch.bfloat16
    assert not any(parameter.requires_grad for parameter in fast.parameters())
    backbone_conv = fast.backbone[0].body.layer1[0].conv1.weight
    assert backbone_conv.dtype == torch.bfloat16
    assert backbone_conv.is_contiguous(memory_format=torch.channels_last)
    assert fast.transformer.reference_points.weight.dtype == torch.float32


def test_float32_preparation_changes_nothing_but_the_folded_norms() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config())[0].eval()
    randomize_zero_initialised(model)
    _randomize_norms(model)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(images)
        got = prepare_for_inference(copy.deepcopy(model), "cpu", dtype="float32")(images)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=1e-4, atol=1e-4)
