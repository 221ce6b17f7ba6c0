"""Deformable DETR command line: train, evaluate, predict, visualize.

    python main.py train   --config configs/demo_shapes.yaml [--opts key=value ...]
    python main.py eval    --config configs/demo_shapes.yaml --opts resume=outputs/demo_shapes/checkpoint.pth
    python main.py predict --config configs/demo_shapes.yaml --opts resume=CKPT --image A.png B.png --out DIR
    python main.py visualize --config configs/demo_shapes.yaml --opts resume=CKPT --image A.png --out DIR \
        [--points X,Y ...] [--layer N] [--by-level] [--by-head]
    python main.py export  --config configs/deformable_detr.yaml --opts resume=CKPT --out model.onnx \
        [--exporter dynamo|torchscript]

``--opts`` overrides config keys (``util.config``; values read as YAML: ``lr=1e-4``, ``amp=bfloat16``,
``train_scales=[96,128]``). Several processes, on one machine or many, through torchrun (env:// rendezvous;
NCCL on GPUs, gloo on the CPU):

    torchrun --nproc_per_node=8 main.py train --config configs/deformable_detr.yaml --opts coco_path=data/coco
    # on each of two machines, the same command (HOST: one of them, reachable from both):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=run1 \\
        main.py train --config configs/deformable_detr.yaml

``batch_size`` is per process. A run writes under ``output_dir``: config.yaml, checkpoint.pth (every epoch),
checkpointNNNN.pth, log.txt, detections.json, metrics.json. ``--opts resume=OUTPUT_DIR/checkpoint.pth``
continues a run at the next epoch.
"""

from __future__ import annotations

import argparse
import sys

from engine.commands import evaluate_checkpoint, predict, train, visualize
from engine.export import EXPORTERS, export_checkpoint
from util.config import load_config
from util.distributed import shutdown_distributed
from util.errors import RunError, UserError

COMMANDS = ("train", "eval", "predict", "visualize", "export")


def parse_point(text: str) -> tuple[float, float]:
    """``"x,y"`` (pixels of the original image) -> (x, y)."""
    try:
        x, y = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is x,y in pixels (e.g. 120,64), got {text!r}") from None
    return x, y


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--image", nargs="+", default=[], help="predict, visualize: image files")
    parser.add_argument(
        "--out",
        default=None,
        help="predict, visualize: output folder (default OUTPUT_DIR/predictions or OUTPUT_DIR/visualize); "
        "export: the .onnx file (default OUTPUT_DIR/model.onnx)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="predict, visualize: lowest score drawn and written"
    )
    parser.add_argument(
        "--exporter", choices=EXPORTERS, default="dynamo", help="export: torch.onnx's exporter (engine/export.py)"
    )
    visualizing = parser.add_argument_group("visualize: where the deformable attention samples")
    visualizing.add_argument("--top-k", type=int, default=4, help="decoder panels for the best K detections")
    visualizing.add_argument(
        "--points",
        nargs="+",
        type=parse_point,
        default=None,
        metavar="X,Y",
        help="encoder query pixels of the original image (default: the detections' centres)",
    )
    visualizing.add_argument(
        "--layer", type=int, default=-1, help="encoder and decoder layer to show (default -1: the last)"
    )
    visualizing.add_argument("--by-level", action="store_true", help="also a panel per feature level")
    visualizing.add_argument("--by-head", action="store_true", help="also a panel per attention head")
    visualizing.add_argument(
        "--query-level",
        type=int,
        default=0,
        help="feature level whose cell at each point is the encoder query (default 0: finest)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("predict", "visualize") and not args.image:
        parser.error(f"{args.command} needs --image IMG [IMG ...]")
    cfg = load_config(args.config, overrides=args.opts)
    try:
        if args.command == "train":
            train(cfg)
        elif args.command == "eval":
            evaluate_checkpoint(cfg)
        elif args.command == "export":
            path = export_checkpoint(cfg, args.out or f"{cfg.output_dir}/model.onnx", args.exporter)
            print(f"wrote {path}")
        elif args.command == "predict":
            predict(cfg, args.image, args.out or f"{cfg.output_dir}/predictions", args.threshold)
        else:
            visualize(
                cfg,
                args.image,
                args.out or f"{cfg.output_dir}/visualize",
                args.threshold,
                args.top_k,
                args.points,
                args.layer,
                args.by_level,
                args.by_head,
                args.query_level,
            )
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
