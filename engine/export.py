"""ONNX export of the detector: ``python main.py export --config F --opts resume=CKPT --out model.onnx``.

The exported graph takes ``images`` (B, 3, H, W) float32, normalised with ImageNet's mean and std as for
``main.py predict``, any B and any H, W of at least :func:`min_image_side` pixels, all images of a batch unpadded,
and returns ``logits`` (B, Q, num_classes) before sigmoid and ``boxes`` (B, Q, 4) as cx, cy, w, h in [0, 1] of
the image: the two inputs of ``models.PostProcess``. Multi-scale deformable attention is exported in one of two
standard formulations (``--attention``):

- ``gridsample`` (default): the ``pytorch`` backend, ONNX ``GridSample`` (opset 18 here); runs in onnxruntime,
  OpenVINO and any runtime of opset 16 and later.
- ``deformconv``: the ``deformconv`` backend, one ONNX ``DeformConv`` per level (opset 19); onnxruntime samples it
  about twice as fast as ``GridSample`` (benchmarks/RESULTS.md); OpenVINO 2026.4 cannot read ``DeformConv``.

A DCN backbone's deformable convolutions follow: their ``grid_sample`` im2col (``GridSample``) with the first,
torchvision's kernel (``DeformConv``) with the second.

Two exporters of ``torch.onnx``:

- ``dynamo`` (default; needs ``onnxscript``): ``torch.export`` with symbolic batch, height and width, the
  exporter PyTorch maintains. Slow to export (the symbolic shape reasoning takes minutes on 2 CPU cores).
- ``torchscript``: the tracing exporter, deprecated by PyTorch but several times faster; the sizes are traced
  as dynamic too. Both are tested against PyTorch on two image sizes and batch 2 (tests/test_export_onnx.py).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from models import DeformableDETR, build_model
from models.describe import describe_state_dict
from models.inference import fold_batch_norms
from ops import DeformConv2d, MSDeformAttn
from util.atomic_write import atomic_path
from util.checkpoint import load_checkpoint, load_model_weights
from util.config import Config
from util.errors import UserError

EXPORTERS = ("dynamo", "torchscript")
# --attention: (the MSDeformAttn backend traced, a DCN backbone's DeformConv2d backend, the opset written);
# GridSample needs 16, DeformConv 19, and 18 is the dynamo exporter's lowest
ATTENTIONS = {"gridsample": ("pytorch", "pytorch", 18), "deformconv": ("deformconv", "torchvision", 19)}
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["logits", "boxes"]


class ExportableDetector(nn.Module):
    """The detector with one tensor in and two out: ``images`` (B, 3, H, W) normalised ->
    ``logits`` (B, Q, num_classes) before sigmoid, ``boxes`` (B, Q, 4) cx, cy, w, h in [0, 1]."""

    def __init__(self, detector: DeformableDETR) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.detector(images)
        return outputs["pred_logits"], outputs["pred_boxes"]


def use_attention_backend(model: nn.Module, backend: str) -> int:
    """Switch every ``MSDeformAttn`` in ``model`` to ``backend`` (see ``ops.ms_deform_attn``); returns how many."""
    modules = [module for module in model.modules() if isinstance(module, MSDeformAttn)]
    for module in modules:
        module.backend = backend
    return len(modules)


def coarsest_stride(detector: DeformableDETR) -> int:
    """Stride of the detector's last feature level: the backbone's last, doubled by every extra level."""
    strides = detector.backbone.strides
    return strides[-1] * 2 ** (detector.num_feature_levels - len(strides))


def min_image_side(detector: DeformableDETR) -> int:
    """The smallest height and width the exported graph accepts: the coarsest level must be at least 2 x 2 (the
    exporter's symbolic shapes assume it), so one pixel more than the coarsest stride."""
    return coarsest_stride(detector) + 1


def check_export_options(exporter: str, attention: str) -> None:
    """Raise a UserError for an exporter or attention not known, or a pair that cannot export."""
    if exporter not in EXPORTERS:
        raise UserError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if attention not in ATTENTIONS:
        raise UserError(f"attention must be one of {tuple(ATTENTIONS)}, got {attention!r}")
    if attention == "deformconv" and exporter != "dynamo":
        raise UserError("--attention deformconv needs --exporter dynamo (the torchscript exporter has no DeformConv)")


def export_onnx(
    detector: DeformableDETR,
    path: str | Path,
    *,
    exporter: str = "dynamo",
    attention: str = "gridsample",
    example_size: tuple[int, int] | None = None,
) -> Path:
    """Write ``detector`` (in eval mode, its attention on the backend of ``attention``) as ONNX to ``path``.

    Args:
        detector: the model, unchanged: a copy is exported, in eval mode, its backbone's frozen batch norms folded
            into their convolutions (a Conv with its ReLU in the graph, not Conv, Mul, Add, ReLU) and its
            deformable attention on the backend of ``attention``.
        path: the ``.onnx`` file to write (its folder is created).
        exporter: ``"dynamo"`` or ``"torchscript"`` (see the module docstring).
        attention: ``"gridsample"`` or ``"deformconv"`` (see the module docstring).
        example_size: (H, W) of the example batch traced, default 4 x the coarsest stride (a multiple of every
            level's stride, so that no size is rounded while tracing).

    Returns:
        ``path``. Inputs and outputs are named ``images``; ``logits``, ``boxes``; batch, height and width dynamic.
    """
    check_export_options(exporter, attention)
    backend, dcn_backend, opset = ATTENTIONS[attention]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    detector = copy.deepcopy(detector).eval()
    fold_batch_norms(detector.backbone)
    use_attention_backend(detector, backend)
    for module in detector.modules():  # a DCN backbone samples as the attention does
        if isinstance(module, DeformConv2d):
            module.backend = dcn_backend
    wrapped = ExportableDetector(detector).eval()
    side = 4 * coarsest_stride(detector)
    height, width = example_size or (side, side)
    # batch 2: an example of size 1 would be specialised by torch.export
    example = torch.randn(2, 3, height, width, device=next(detector.parameters()).device)
    with torch.no_grad():
        if exporter == "dynamo":
            smallest = min_image_side(detector)
            dynamic = {
                0: torch.export.Dim("batch", min=1, max=1024),
                2: torch.export.Dim("height", min=smallest, max=8192),
                3: torch.export.Dim("width", min=smallest, max=8192),
            }
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                dynamic_shapes={"images": dynamic},
                external_data=False,
                # onnxscript 0.7's graph optimizer drops a node of the box refinement (its output is then read but
                # never written: onnxruntime refuses the model); onnxruntime optimises the graph itself anyway
                optimize=False,
            )
            with atomic_path(path) as temporary:
                program.save(str(temporary))
        else:
            with atomic_path(path) as temporary:
                torch.onnx.export(
                    wrapped,
                    (example,),
                    str(temporary),
                    dynamo=False,
                    opset_version=opset,
                    input_names=INPUT_NAMES,
                    output_names=OUTPUT_NAMES,
                    dynamic_axes={
                        "images": {0: "batch", 2: "height", 3: "width"},
                        "logits": {0: "batch"},
                        "boxes": {0: "batch"},
                    },
                )
    return path


def export_checkpoint(cfg: Config, out: str | Path, exporter: str = "dynamo", attention: str = "gridsample") -> Path:
    """``main.py export``: build the model of ``cfg``, load ``cfg.resume`` and export it to ``out``."""
    check_export_options(exporter, attention)
    if not cfg.resume:
        raise UserError(
            "export needs a checkpoint: --opts resume=PATH (a file written by main.py train or main.py convert)"
        )
    if not Path(cfg.resume).is_file():
        raise UserError(f"resume={cfg.resume!r}: no such checkpoint file")
    # every weight comes from the checkpoint: no ImageNet download
    model, _, _ = build_model(dataclasses.replace(cfg, pretrained_backbone=False, attention_backend="pytorch"))
    try:
        load_model_weights(model, load_checkpoint(cfg.resume), cfg.resume, describe=describe_state_dict)
    except ValueError as error:  # a checkpoint of another variant or size: the message names both
        raise UserError(str(error)) from error
    return export_onnx(model, out, exporter=exporter, attention=attention)
