"""engine.dcn_view: the 729 traced points of three stacked deformable convolutions, main.py visualize with a DCN
backbone, and the drawing of deformed RoI bins."""

from __future__ import annotations

import json

import torch
from matplotlib.patches import Rectangle
from PIL import Image

import main
from engine.dcn_view import deform_layers, roi_bins_figure, trace_sampling
from models import CONFIG_DIR, build_model
from ops import DeformConv2d, record_sampling
from tests.test_engine_visualize import SMALL, write_image
from tests.tiny_model import TINY, randomize_zero_initialised, tiny_config
from util.checkpoint import save_checkpoint


def shifted_layers(mask_logit: float) -> torch.nn.Sequential:
    """Three 3x3 v2 layers (stride 1, padding 1) that move every tap one row down, with masks sigmoid(mask_logit)."""
    layers = torch.nn.Sequential(*(DeformConv2d(2, 2, 3, padding=1, modulated=True) for _ in range(3)))
    with torch.no_grad():
        for layer in layers:
            layer.conv_offset.bias[0:18:2] = 1.0  # dy of every tap
            layer.conv_offset.bias[18:] = mask_logit
    return layers


def test_three_layers_trace_729_points_around_the_shifted_query():
    layers = shifted_layers(mask_logit=0.0)
    with record_sampling(layers) as records:
        layers(torch.randn(1, 2, 12, 12))
    chain = deform_layers(layers, records)
    assert [record.name for record in chain] == ["0", "1", "2"]
    # the image is twice the network's input: pixel (9, 9) is input pixel 4.5, cell 4
    (trace,) = trace_sampling(chain, [(9.0, 9.0)], resized_size=(12, 12), image_size=(24, 24))
    assert trace.points.shape == (729, 2)
    # cells: column 4 + three taps in {-1, 0, 1}; row 4 + three taps in {-1, 0, 1} + three shifts of 1
    cells = (trace.points + 0.5) / 2 - 0.5
    columns, rows = cells[:, 0], cells[:, 1]
    assert sorted(set(columns.round().tolist())) == list(range(1, 8))
    assert sorted(set(rows.round().tolist())) == list(range(4, 11))
    torch.testing.assert_close(trace.points.mean(0), torch.tensor([(4 + 0.5) * 2 - 0.5, (7 + 0.5) * 2 - 0.5]))
    torch.testing.assert_close(trace.weights, torch.full((729,), 0.5**3))


def test_visualize_draws_the_dcn_sampling_of_a_dcn_backbone(tmp_path):
    overrides = [*TINY, "dcn_stages=[4, 5]", "dcn_modulated=true"]
    torch.manual_seed(0)
    cfg = tiny_config("dcn_stages=[4, 5]", "dcn_modulated=true")
    model, _, _ = build_model(cfg)
    randomize_zero_initialised(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".conv_offset." in name:
                parameter.normal_(0, 0.05)
    checkpoint = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "epoch": 0, "config": cfg.to_dict()}, checkpoint)
    image = write_image(tmp_path / "gradient.png")
    arguments = ["visualize", "--config", str(CONFIG_DIR / "deformable_detr.yaml"), "--opts", *overrides, *SMALL]
    arguments += [f"resume={checkpoint}", "--image", image, "--out", str(tmp_path / "out"), "--threshold", "0"]
    assert main.main([*arguments, "--top-k", "2"]) == 0
    assert (tmp_path / "out" / "gradient_dcn_sampling.png").is_file()
    record = json.loads((tmp_path / "out" / "gradient_sampling.json").read_text())
    assert record["dcn"]["layers"] == ["backbone.0.body.layer4.0.conv2", "backbone.0.body.layer4.1.conv1",
                                       "backbone.0.body.layer4.1.conv2"]  # fmt: skip
    assert record["dcn"]["modulated"] is True
    assert len(record["dcn"]["queries"]) == 2 and len(record["dcn"]["queries"][0]["points"]) == 729
    assert "encoder" in record  # the attention record is still there


def test_roi_bins_figure_draws_each_box_and_its_deformed_bins():
    boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 20.0, 50.0, 60.0]])
    offset = torch.randn(2, 2, 3, 3)
    figure = roi_bins_figure(Image.new("RGB", (64, 64)), boxes, offset, torch.rand(2, 1, 3, 3), output_size=(3, 3))
    rectangles = [patch for patch in figure.axes[0].patches if isinstance(patch, Rectangle)]
    assert len(rectangles) == 2 * (1 + 9)
