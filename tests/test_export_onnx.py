"""engine.export: a tiny detector exported to ONNX (the attention as GridSample or as DeformConv), run in
onnxruntime at two image sizes and batch 1 and 2, compared with PyTorch (max absolute difference at most 1e-4 on
logits and boxes; about 5e-7 observed)."""

from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch

import main
from engine.export import export_onnx, min_image_side
from models import CONFIG_DIR, build_model
from ops.functional import FORMULATIONS
from ops.reference import reference_ms_deform_attn
from tests.conftest import make_edge_problem
from tests.tiny_model import TINY, VARIANTS, randomize_zero_initialised, tiny_config
from util.checkpoint import save_checkpoint

TOLERANCE = 1e-4
SIZES = [(1, 96, 128), (2, 160, 96)]  # (batch, height, width): neither is the size traced (256 x 256)


def tiny_detector(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(*VARIANTS[variant]))
    randomize_zero_initialised(model)
    return model.eval()


def assert_onnx_matches_pytorch(path, model: torch.nn.Module) -> None:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for batch, height, width in SIZES:
        images = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = model(images)
        logits, boxes = session.run(["logits", "boxes"], {"images": images.numpy()})
        assert logits.shape == tuple(expected["pred_logits"].shape)
        assert boxes.shape == tuple(expected["pred_boxes"].shape)
        torch.testing.assert_close(torch.from_numpy(logits), expected["pred_logits"], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.from_numpy(boxes), expected["pred_boxes"], atol=TOLERANCE, rtol=0)


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_main_export_writes_a_graph_that_onnxruntime_runs_like_pytorch(tmp_path):
    model = tiny_detector("deformable_detr")
    checkpoint = save_checkpoint({"model": model.state_dict()}, tmp_path / "checkpoint.pth")
    out = tmp_path / "model.onnx"
    status = main.main(
        [
            "export",
            "--config",
            str(CONFIG_DIR / "deformable_detr.yaml"),
            "--opts",
            *TINY,
            f"resume={checkpoint}",
            "--out",
            str(out),
            "--exporter",
            "torchscript",
        ]
    )
    assert status == 0
    assert "GridSample" in op_types(out)  # the attention's grid_sample formulation, no custom op
    assert_onnx_matches_pytorch(out, model)


def test_two_stage_exports_with_dynamic_sizes(tmp_path):
    model = tiny_detector("two_stage")
    path = export_onnx(model, tmp_path / "two_stage.onnx", exporter="torchscript")
    assert_onnx_matches_pytorch(path, model)


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_outputs(tmp_path):
    model = tiny_detector("box_refine")
    path = export_onnx(model, tmp_path / "box_refine.onnx", exporter="dynamo")
    assert "GridSample" in op_types(path)
    assert_onnx_matches_pytorch(path, model)


@pytest.mark.slow
def test_deformconv_attention_exports_to_deformconv_with_dynamic_sizes(tmp_path):
    model = tiny_detector("deformable_detr")
    checkpoint = save_checkpoint({"model": model.state_dict()}, tmp_path / "checkpoint.pth")
    out = tmp_path / "model.onnx"
    config = str(CONFIG_DIR / "deformable_detr.yaml")
    arguments = ["export", "--config", config, "--opts", *TINY, f"resume={checkpoint}", "--out", str(out)]
    assert main.main([*arguments, "--attention", "deformconv"]) == 0
    types = op_types(out)
    assert "DeformConv" in types and "GridSample" not in types
    assert_onnx_matches_pytorch(out, model)


class Attention(torch.nn.Module):
    """One formulation of the attention alone (``ops.functional.FORMULATIONS``), at fixed level shapes."""

    def __init__(self, formulation: str, level_shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.formulation, self.level_shapes = FORMULATIONS[formulation], level_shapes

    def forward(self, value, sampling_locations, attention_weights):
        return self.formulation(value, self.level_shapes, sampling_locations, attention_weights)


@pytest.mark.parametrize(
    "formulation, opset, op_type, queries",
    [
        ("deformconv", 19, "DeformConv", 49),  # the grid layout
        ("deformconv", 19, "DeformConv", 5),  # the row layout
        ("pytorch", 18, "GridSample", 49),
    ],
)
def test_exported_formulation_samples_every_edge_as_the_reference(tmp_path, formulation, opset, op_type, queries):
    # the exported graph leaves samples outside their map to the zero padding (no Where, as in PyTorch): every edge
    # of the op's definition through onnxruntime; with DeformConv NaN locations too (GridSample samples them as a
    # pixel in onnxruntime)
    problem = make_edge_problem()
    value = problem["value"].float()
    locations = problem["sampling_locations"][:, :queries].float().clone()
    weights = problem["attention_weights"][:, :queries].float()
    expected_weights = weights.clone()
    if op_type == "DeformConv":
        locations[0, 1, 0] = float("nan")  # every level and point of head 0 of query 1: they must contribute 0
        expected_weights[0, 1, 0] = 0
    expected = reference_ms_deform_attn(
        value.double(),
        problem["spatial_shapes"],
        problem["level_start_index"],
        locations.nan_to_num(0.0).double(),
        expected_weights.double(),
    )
    path = tmp_path / "attention.onnx"
    module = Attention(formulation, problem["level_shapes"])
    torch.onnx.export(module, (value, locations, weights), str(path), dynamo=True, opset_version=opset)
    assert op_type in op_types(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [graph_input.name for graph_input in session.get_inputs()]
    (output,) = session.run(None, dict(zip(names, (value.numpy(), locations.numpy(), weights.numpy()))))
    torch.testing.assert_close(torch.from_numpy(output).double(), expected, rtol=1e-5, atol=1e-5)


def test_deformconv_attention_with_the_torchscript_exporter_is_refused(tmp_path, capsys):
    checkpoint = save_checkpoint({"model": tiny_detector("deformable_detr").state_dict()}, tmp_path / "checkpoint.pth")
    config = str(CONFIG_DIR / "deformable_detr.yaml")
    arguments = ["export", "--config", config, "--opts", *TINY, f"resume={checkpoint}", "--out", str(tmp_path / "m")]
    assert main.main([*arguments, "--attention", "deformconv", "--exporter", "torchscript"]) == 2
    assert "--attention deformconv needs --exporter dynamo" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_dcn_backbone_exports_its_deformable_convolutions_as_grid_sample(tmp_path):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config("dcn_stages=[4,5]"))
    randomize_zero_initialised(model)
    model.eval()
    path = export_onnx(model, tmp_path / "dcn.onnx", exporter="torchscript")
    assert "DeformConv" not in op_types(path)  # readable by runtimes without DeformConv (OpenVINO)
    assert_onnx_matches_pytorch(path, model)


def test_min_image_side_is_one_pixel_more_than_the_coarsest_stride():
    assert min_image_side(tiny_detector("deformable_detr")) == 65  # stride 64: C3-C5 and one extra level
    assert min_image_side(tiny_detector("single_scale")) == 33


def test_export_without_a_checkpoint_is_refused(tmp_path, capsys):
    status = main.main(["export", "--config", str(CONFIG_DIR / "deformable_detr.yaml"), "--opts", *TINY])
    assert status == 2
    assert "export needs a checkpoint: --opts resume=PATH" in capsys.readouterr().err
