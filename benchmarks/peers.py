"""CPU latency of the R50 Deformable DETR beside its peers, and the arithmetic floor; prints a Markdown table.

    python -m benchmarks.peers [--sizes 800x1333 480x640] [--repeats 3] [--warmup 1] [--rows ours-bf16 ...]
    /work/venv-openvino/bin/python -m benchmarks.peers    # an environment with OpenVINO: its rows too

Random weights (latency does not depend on them), batch 1, one process; at each size the rows take turns (a round
runs one forward of every row, a quarter of a second apart; ``--warmup`` rounds untimed, then ``--repeats``
timed), so that a drift of the machine's speed slows them alike; the median of each row's forwards. The rows:

- ours, ``models.inference.prepare_for_inference`` in bfloat16 and in float32 (the path of a CPU without native
  bfloat16), and the model as built in float32 ("eager");
- our ONNX graph (``engine.export.export_onnx``, dynamo, dynamic size) in onnxruntime float32 (the attention as
  DeformConv and as GridSample) and in OpenVINO (GridSample, which it reads) with the bfloat16 and the float32
  inference precision, reshaped to each size; when those packages are installed;
- transformers' ``DeformableDetrForObjectDetection`` (its own ResNet-50, the same multi-scale configuration) in
  float32 and under bfloat16 autocast, when transformers is installed;
- the arithmetic floor: the forward's FLOPs (``torch.utils.flop_counter``, 2 per multiply-add, float32 eager)
  divided by the rate this process measures for one large bfloat16 (float32) matrix product.

A row that cannot run here (a package missing) is left out, with a line saying why.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import describe_machine
from engine.export import export_onnx
from models import build_model, published_variant
from models.inference import native_bfloat16, prepare_for_inference
from util.timing import interleaved_medians, median_ms

CPU = torch.device("cpu")
VARIANT = "deformable_detr"
PAUSE = 0.25  # seconds between two rows' forwards: the runtimes' idle threads stop spinning
MATMUL_SIDE = 2048  # side of the square matrix product that measures the CPU's rate

# A row's runner: (height, width) -> a call that runs one forward at that size.
Runner = Callable[[tuple[int, int]], Callable[[], object]]


def our_model() -> torch.nn.Module:
    """The R50 multi-scale Deformable DETR, random weights, in eval mode."""
    torch.manual_seed(0)
    cfg = published_variant(VARIANT).load_config(["pretrained_backbone=false"])
    return build_model(cfg)[0].eval()


def torch_runner(model: torch.nn.Module, autocast: torch.dtype | None = None) -> Runner:
    def at(size: tuple[int, int]) -> Callable[[], object]:
        images = torch.randn(1, 3, *size)

        def forward() -> object:
            with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
                return model(images)

        return forward

    return at


def onnxruntime_runner(onnx_path: Path) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def at(size: tuple[int, int]) -> Callable[[], object]:
        feed = {"images": torch.randn(1, 3, *size).numpy()}
        return lambda: session.run(None, feed)

    return at


def openvino_runner(onnx_path: Path, precision: str) -> Runner:
    """OpenVINO on the CPU with ``precision`` ("bf16" or "f32") as its inference precision hint, the graph
    reshaped to each size (static shapes, as a deployer compiles it)."""
    import openvino

    core = openvino.Core()

    def at(size: tuple[int, int]) -> Callable[[], object]:
        graph = core.read_model(str(onnx_path))
        graph.reshape({"images": [1, 3, *size]})
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        compiled = core.compile_model(graph, "CPU", config)
        images = torch.randn(1, 3, *size).numpy()
        return lambda: compiled(images)

    return at


def transformers_model() -> torch.nn.Module:
    """transformers' Deformable DETR in the configuration of ours (R50 from transformers' own ResNet, 4 levels,
    300 queries, 6 + 6 layers), random weights, in eval mode."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False)
    return DeformableDetrForObjectDetection(config).eval()


def forward_flops(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """FLOPs of one float32 forward at ``size`` (2 per multiply-add), as torch's FLOP counter sees them."""
    counter = FlopCounterMode(display=False)
    model.requires_grad_(False)  # the counter's module tracker hooks gradients of any tensor that wants one
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, *size))
    return counter.get_total_flops()


def matmul_rate(dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of one (MATMUL_SIDE x MATMUL_SIDE) @ (MATMUL_SIDE x MATMUL_SIDE) product in ``dtype`` here."""
    left, right = torch.randn(2, MATMUL_SIDE, MATMUL_SIDE, dtype=dtype)
    milliseconds = median_ms(lambda: torch.mm(left, right), CPU, max(repeats, 5))
    return 2 * MATMUL_SIDE**3 / (milliseconds / 1e3)


def onnx_graph(folder: Path, attention: str) -> Path:
    """Our model exported (dynamo, dynamic size) with the attention as ``attention``, once per folder."""
    path = folder / f"model_{attention}.onnx"
    return path if path.exists() else export_onnx(our_model(), path, attention=attention)


def runners(wanted: list[str], folder: Path) -> tuple[dict[str, Runner], list[str]]:
    """The rows of ``wanted`` (keys of ROWS) that can run here, by label, and a note for each that cannot."""
    rows: dict[str, Runner] = {}
    notes: list[str] = []
    if "ours-bf16" in wanted:
        rows["ours, `prepare_for_inference` (bfloat16)"] = torch_runner(
            prepare_for_inference(our_model(), CPU, "bfloat16")
        )
        if not native_bfloat16(CPU):
            notes.append("this CPU has no native bfloat16: the bfloat16 rows are emulated")
    if "ours-fp32" in wanted:
        rows["ours, `prepare_for_inference` (float32)"] = torch_runner(
            prepare_for_inference(our_model(), CPU, "float32")
        )
    if "ours-eager" in wanted:
        rows["ours, float32 eager"] = torch_runner(our_model())
    for package in [name for name in ("onnxruntime", "openvino") if name in wanted]:
        if importlib.util.find_spec(package) is None:
            notes.append(f"{package} is not installed: its rows are left out")
            continue
        version = importlib.import_module(package).__version__.split("-")[0]
        if package == "onnxruntime":
            for attention, ops in (("deformconv", "DeformConv"), ("gridsample", "GridSample")):
                path = onnx_graph(folder, attention)
                rows[f"onnxruntime {version}, float32, on our ONNX graph ({ops})"] = onnxruntime_runner(path)
        else:  # OpenVINO 2026.4 cannot read DeformConv
            for precision, name in (("bf16", "bfloat16"), ("f32", "float32")):
                path = onnx_graph(folder, "gridsample")
                rows[f"OpenVINO {version}, {name}, on our ONNX graph (GridSample)"] = openvino_runner(path, precision)
    if "transformers" in wanted:
        if importlib.util.find_spec("transformers") is None:
            notes.append("transformers is not installed: its rows are left out")
        else:
            import transformers

            peer = transformers_model()
            rows[f"transformers {transformers.__version__} DeformableDetr, float32"] = torch_runner(peer)
            rows[f"transformers {transformers.__version__} DeformableDetr, bfloat16 autocast"] = torch_runner(
                peer, torch.bfloat16
            )
    return rows, notes


ROWS = ("ours-bf16", "ours-fp32", "ours-eager", "onnxruntime", "openvino", "transformers", "floor")


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    if not (height.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"a size is HEIGHTxWIDTH, e.g. 800x1333, got {text!r}")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(800, 1333), (480, 640)], metavar="HxW")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    args = parser.parse_args(argv)
    sizes = args.sizes
    print(f"cpu: {describe_machine(CPU)}; {VARIANT}, random weights, batch 1, median of {args.repeats}\n")
    header = " | ".join(f"{height}x{width} ms" for height, width in sizes)
    print(f"| system | {header} |\n|---|{'---:|' * len(sizes)}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        rows, notes = runners(args.rows, Path(folder))
        # each size's rows timed in turns: a drift of the machine's speed slows every row alike
        cells = []
        for height, width in sizes:
            print(f"timing {len(rows)} rows at {height}x{width} in turns...", file=sys.stderr, flush=True)
            calls = {label: at((height, width)) for label, at in rows.items()}
            cells.append(interleaved_medians(calls, CPU, args.repeats, args.warmup, pause=PAUSE))
        for label in rows:
            print(f"| {label} | {' | '.join(f'{medians[label]:.0f}' for medians in cells)} |", flush=True)
    if "floor" in args.rows:
        model = our_model()
        flops = [forward_flops(model, size) for size in sizes]
        dtypes = ((torch.bfloat16, "bfloat16"), (torch.float32, "float32"))
        if not native_bfloat16(CPU):  # an emulated product's rate is no floor (0.3 GFLOP/s on an AVX2 EPYC)
            dtypes = dtypes[1:]
            notes.append("this CPU has no native bfloat16: no bfloat16 floor")
        for dtype, name in dtypes:
            rate = matmul_rate(dtype, args.repeats)
            cells = " | ".join(f"{count / rate * 1e3:.0f}" for count in flops)
            print(f"| arithmetic floor, {name} ({rate / 1e12:.2f} TFLOP/s measured) | {cells} |")
        print("\nFLOPs of a forward: " + ", ".join(f"{h}x{w} {c / 1e9:.0f} G" for (h, w), c in zip(sizes, flops)))
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
