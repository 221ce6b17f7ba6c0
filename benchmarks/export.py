"""Export time and CPU latency of the exported graph in onnxruntime against PyTorch; prints a Markdown table.

    python -m benchmarks.export --config configs/deformable_detr.yaml --size 800 1333 [--exporter torchscript]
    python -m benchmarks.export --opts backbone=resnet18 hidden_dim=64 ... --size 96 128   # a tiny model

Random weights (latency does not depend on them); batch 1; the median of ``--runs`` runs after one warm-up.
PyTorch runs the attention's pytorch backend (the exported formulation) and, where the C++ kernel builds, the
"cpu" backend.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from engine.export import ATTENTIONS, EXPORTERS, export_onnx, use_attention_backend
from models import build_model
from ops import available_backends
from util.config import load_config
from util.timing import median_ms

CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--opts", nargs="*", default=[])
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo")
    parser.add_argument("--attention", choices=tuple(ATTENTIONS), default="gridsample")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    import onnxruntime

    cfg = load_config(args.config, overrides=[*args.opts, "pretrained_backbone=false"])
    model, _, _ = build_model(cfg)
    model.eval()
    images = torch.randn(1, 3, *args.size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        start = time.perf_counter()
        export_onnx(model, path, exporter=args.exporter, attention=args.attention)
        export_seconds = time.perf_counter() - start
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy()}
        rows = [("onnxruntime (CPU)", median_ms(lambda: session.run(None, feed), CPU, args.runs))]
    for backend in [name for name in ("pytorch", "cpu") if name in available_backends()]:
        use_attention_backend(model, backend)
        with torch.no_grad():
            rows.append((f"PyTorch, attention backend {backend}", median_ms(lambda: model(images), CPU, args.runs)))
    print(
        f"export ({args.exporter}, attention as {args.attention}): {export_seconds:.1f} s; "
        f"{torch.get_num_threads()} threads, batch 1, {args.size[0]}x{args.size[1]}\n"
    )
    print("| runtime | latency (median) |\n|---|---:|")
    for name, milliseconds in rows:
        print(f"| {name} | {milliseconds:.0f} ms |")


if __name__ == "__main__":
    main()
