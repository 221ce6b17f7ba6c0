"""models.convert: transformers' Deformable DETR checkpoints to ours and back.

Without transformers: our weights round-trip through the key map, and what cannot be mapped is refused by name.
With transformers installed (not a requirement; skipped otherwise): a tiny random transformers model, saved as the
hub has it, converted, gives the same logits and boxes as ours on the same images (max absolute difference at most
1e-5; 0 observed on the CPU), and our checkpoint converted back loads in transformers with the same outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from main import main
from models import build_model
from models.convert import (
    config_from_hf,
    config_to_hf,
    convert_from_hf,
    from_hf_state_dict,
    hf_key,
    to_hf_state_dict,
)
from tests.tiny_model import TINY, VARIANTS, randomize_zero_initialised, tiny_config
from util.checkpoint import load_checkpoint, save_checkpoint
from util.config import load_config
from util.errors import UserError

TOLERANCE = 1e-5
HF_VARIANTS = ["deformable_detr", "box_refine", "two_stage", "single_scale"]


def tiny_model(variant: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, _, _ = build_model(tiny_config(*VARIANTS[variant]))
    randomize_zero_initialised(model, seed)
    return model.eval()


@pytest.mark.parametrize("variant", ["deformable_detr", "box_refine", "two_stage", "single_scale"])
def test_our_weights_round_trip_through_the_key_map(variant):
    own = tiny_model(variant).state_dict()
    hf_weights = to_hf_state_dict(own)
    assert all(key.startswith(("model.", "class_embed.", "bbox_embed.")) for key in hf_weights)
    back = from_hf_state_dict(hf_weights, own, shared_heads=variant in ("deformable_detr", "single_scale"))
    assert back.keys() == own.keys()
    for key, tensor in own.items():
        assert torch.equal(back[key], tensor), key


def test_the_decoder_self_attention_is_split_into_query_key_and_value():
    assert hf_key("transformer.decoder.layers.3.self_attn.in_proj_weight") == [
        "model.decoder.layers.3.self_attn.q_proj.weight",
        "model.decoder.layers.3.self_attn.k_proj.weight",
        "model.decoder.layers.3.self_attn.v_proj.weight",
    ]
    assert hf_key("transformer.encoder.layers.0.norm1.weight") == "model.encoder.layers.0.self_attn_layer_norm.weight"
    assert hf_key("transformer.decoder.layers.0.norm1.bias") == "model.decoder.layers.0.encoder_attn_layer_norm.bias"
    assert hf_key("backbone.0.body.layer1.0.conv1.weight") == "model.backbone.conv_encoder.model.layer1.0.conv1.weight"


def test_transformers_5_names_and_heads_saved_once_are_read():
    own = tiny_model("deformable_detr").state_dict()
    hf_weights = to_hf_state_dict(own)
    renamed = {}
    for key, tensor in hf_weights.items():
        if key.startswith(("class_embed.", "bbox_embed.")) and not key.split(".")[1] == "0":
            continue  # a shared head is saved once
        key = key.replace("backbone.conv_encoder.model.", "backbone.model.").replace("out_proj", "o_proj")
        renamed[key.replace(".fc1.", ".mlp.fc1.").replace(".fc2.", ".mlp.fc2.")] = tensor
    back = from_hf_state_dict(renamed, own, shared_heads=True)
    assert torch.equal(back["class_embed.1.weight"], own["class_embed.1.weight"])
    assert torch.equal(
        back["transformer.decoder.layers.1.linear2.bias"], own["transformer.decoder.layers.1.linear2.bias"]
    )


def test_box_heads_are_not_shared_with_box_refinement():
    own = tiny_model("box_refine").state_dict()
    hf_weights = {key: value for key, value in to_hf_state_dict(own).items() if not key.startswith("bbox_embed.1.")}
    hf_weights = {key: value for key, value in hf_weights.items() if not key.startswith("model.decoder.bbox_embed.1.")}
    with pytest.raises(
        UserError,
        match=r"12 weights of ours with no counterpart: transformer\.decoder\.bbox_embed\.1\.layers\.0\.weight",
    ):
        from_hf_state_dict(hf_weights, own, shared_heads=False)


def test_unknown_and_missing_weights_are_named():
    own = tiny_model("deformable_detr").state_dict()
    hf_weights = to_hf_state_dict(own)
    hf_weights["model.backbone.conv_encoder.model.extra.weight"] = torch.zeros(1)
    del hf_weights["model.level_embed"]
    with pytest.raises(UserError) as error:
        from_hf_state_dict(hf_weights, own, shared_heads=True, source="model.safetensors")
    message = str(error.value)
    assert "model.safetensors cannot be converted" in message
    assert "transformer.level_embed (from model.level_embed)" in message
    assert "we cannot map: model.backbone.conv_encoder.model.extra.weight" in message


def test_config_picks_the_variant_and_its_overrides():
    hf_config = {"two_stage": True, "with_box_refine": True, "two_stage_num_proposals": 300, "num_queries": 100}
    config_file, overrides = config_from_hf({**hf_config, "num_labels": 91})
    assert config_file.endswith("deformable_detr_two_stage.yaml") and overrides == []  # num_queries: the proposals
    config_file, overrides = config_from_hf({"num_feature_levels": 1, "dilation": True, "id2label": {"0": "a"}})
    assert config_file.endswith("deformable_detr_single_scale_dc5.yaml") and overrides == ["num_classes=1"]
    config_file, overrides = config_from_hf({"two_stage": True, "num_feature_levels": 3})  # closest: the defaults
    assert config_file.endswith("/deformable_detr.yaml") and overrides == ["num_feature_levels=3", "two_stage=true"]


@pytest.mark.parametrize(
    ("hf_config", "message"),
    [
        ({"use_timm_backbone": False, "backbone_config": {"model_type": "resnet"}}, "transformers' own resnet"),
        ({"backbone": "mobilenetv3_large_100"}, "timm's mobilenetv3_large_100"),
        ({"position_embedding_type": "learned"}, "position_embedding_type='learned' is not supported"),
        ({"encoder_ffn_dim": 1024, "decoder_ffn_dim": 2048}, "decoder_ffn_dim=2048 differ"),
    ],
)
def test_architectures_we_do_not_have_are_refused(hf_config, message):
    with pytest.raises(UserError, match=message):
        config_from_hf(hf_config)


def test_config_round_trips():
    cfg = tiny_config(*VARIANTS["two_stage"])
    config_file, overrides = config_from_hf(config_to_hf(cfg, {1: "circle"}))
    back = load_config(config_file, overrides=[*overrides, "pretrained_backbone=false"])
    for key in ("backbone", "hidden_dim", "dim_feedforward", "nheads", "enc_layers", "dec_layers", "num_queries"):
        assert getattr(back, key) == getattr(cfg, key), key
    assert back.two_stage and back.with_box_refine and back.num_classes == cfg.num_classes


def test_a_folder_without_weights_or_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds neither model.safetensors nor pytorch_model.bin"):
        convert_from_hf(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="config.json is missing"):
        convert_from_hf(tmp_path)


def test_command_line_reads_pytorch_model_bin(tmp_path, capsys):
    """--from-hf of a folder with config.json and pytorch_model.bin: our weights back, and the command to use them."""
    model = tiny_model("box_refine")
    save_checkpoint({"model": model.state_dict()}, tmp_path / "ours.pth")
    cfg = tiny_config(*VARIANTS["box_refine"])
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    torch.save(to_hf_state_dict(model.state_dict()), hf_dir / "pytorch_model.bin")
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "back.pth")]) == 0
    assert "deformable_detr_box_refine.yaml" in capsys.readouterr().out
    back = load_checkpoint(tmp_path / "back.pth")
    for key, tensor in model.state_dict().items():
        assert torch.equal(back["model"][key], tensor), key


# ---- with transformers: outputs of the same weights on the same images


def tiny_hf_model(variant: str):
    import transformers  # a test requirement (requirements.txt): a missing one fails, never skips

    options = {
        "deformable_detr": {},
        "box_refine": {"with_box_refine": True},
        "two_stage": {"with_box_refine": True, "two_stage": True},
        "single_scale": {"num_feature_levels": 1},
    }[variant]
    config = transformers.DeformableDetrConfig(
        backbone="resnet18",
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        d_model=64,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=8,
        two_stage_num_proposals=8,
        num_labels=5,
        **options,
    )
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():  # random weights everywhere, also where the initialisation puts zeros
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def ours_from(checkpoint: dict) -> torch.nn.Module:
    cfg = load_config(overrides=[f"{key}={json.dumps(value)}" for key, value in checkpoint["config"].items()])
    model, _, _ = build_model(cfg)
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def assert_same_detections(hf_model, ours: torch.nn.Module) -> None:
    """Two images, the second padded on the right, except two-stage: there ours never proposes padding (the
    original and transformers can), so padded images may pick other queries."""
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    if not ours.two_stage:
        pixel_mask[1, :, 100:] = 0
    with torch.no_grad():
        expected = hf_model(pixel_values=images, pixel_mask=pixel_mask)
        got = ours(images, pixel_mask == 0)
    torch.testing.assert_close(got["pred_logits"], expected.logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_a_transformers_checkpoint_converts_to_the_same_detections(variant, tmp_path):
    hf_model = tiny_hf_model(variant)
    hf_model.save_pretrained(tmp_path)  # config.json and model.safetensors, as downloaded from the hub
    checkpoint, _, _ = convert_from_hf(tmp_path / "model.safetensors")
    assert_same_detections(hf_model, ours_from(checkpoint))


@pytest.mark.parametrize("variant", ["deformable_detr", "two_stage"])
def test_our_checkpoint_converts_to_transformers_with_the_same_detections(variant, tmp_path):
    import transformers  # a test requirement (requirements.txt): a missing one fails, never skips

    ours = tiny_model(variant)
    save_checkpoint({"model": ours.state_dict()}, tmp_path / "ours.pth")
    opts = [*TINY, *VARIANTS[variant]]
    assert main(["convert", "--to-hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "hf"), "--opts", *opts]) == 0
    hf_model = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hf").eval()
    assert_same_detections(hf_model, ours)


def test_to_hf_with_a_config_that_does_not_describe_the_checkpoint_is_refused(tmp_path, capsys):
    save_checkpoint({"model": tiny_model("deformable_detr").state_dict()}, tmp_path / "ours.pth")
    assert main(["convert", "--to-hf", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert "does not fit this model" in error and "pass the config it was trained with" in error
