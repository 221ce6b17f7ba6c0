"""Deformable DETR command line: train, evaluate, predict, visualize, export, convert.

    python main.py train   --config configs/demo_shapes.yaml [--opts key=value ...]
    python main.py eval    --config configs/demo_shapes.yaml --opts resume=outputs/demo_shapes/checkpoint.pth
    python main.py predict --config configs/demo_shapes.yaml --opts resume=CKPT --image A.png B.png --out DIR
    python main.py visualize --config configs/demo_shapes.yaml --opts resume=CKPT --image A.png --out DIR \
        [--points X,Y ...] [--layer N] [--by-level] [--by-head] [--query-level L]
    python main.py export  --config configs/deformable_detr.yaml --opts resume=CKPT --out model.onnx \
        [--exporter dynamo|torchscript] [--attention gridsample|deformconv]
    python main.py convert --from-hf HUB_FOLDER --out checkpoint.pth      # Hugging Face -> ours
    python main.py convert --to-hf CKPT --config configs/deformable_detr.yaml --out HUB_FOLDER   # and back

Each command takes only its own flags (``python main.py COMMAND --help``). A point with a negative coordinate
may be written as it is (``--points -100,-100``) or glued to the flag (``--points=-100,-100``).

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
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

from engine.convert import convert
from engine.evaluation import evaluate_checkpoint
from engine.export import ATTENTIONS, EXPORTERS, export_checkpoint
from engine.prediction import predict
from engine.train import train
from engine.visualize import visualize
from util.config import Config, load_config
from util.distributed import shutdown_distributed
from util.errors import RunError, UserError
from util.output_paths import check_output_file, check_output_folder

# A value of --points: "x,y", either coordinate possibly negative ("-100,-100"), which argparse would take for a flag.
_POINT_VALUE = re.compile(r"^-?[\d.]")


def parse_point(text: str) -> tuple[float, float]:
    """``"x,y"`` (pixels of the original image, finite; outside the image: its nearest cell) -> (x, y)."""
    try:
        x, y = (float(value) for value in text.split(","))
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"a point is x,y in pixels (e.g. 120,64), got {text!r}")
    return x, y


def parse_score(text: str) -> float:
    """A score threshold in [0, 1]."""
    try:
        score = float(text)
    except ValueError:
        score = float("nan")
    if not 0 <= score <= 1:
        raise argparse.ArgumentTypeError(f"a score threshold is a number in [0, 1] (e.g. 0.5), got {text!r}")
    return score


def whole_number_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``low``."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = low - 1
        if number < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return number

    return parse


def glue_point_values(argv: Sequence[str]) -> list[str]:
    """``--points -100,-100 5,7`` -> ``--points=-100,-100 --points=5,7``, so that argparse does not take a
    negative coordinate for a flag; every other argument is kept as it is."""
    glued: list[str] = []
    in_points = False
    for argument in argv:
        if in_points and (not argument.startswith("-") or _POINT_VALUE.match(argument)):
            if glued[-1] == "--points":
                glued.pop()
            glued.append(f"--points={argument}")
            continue
        in_points = argument == "--points"
        glued.append(argument)  # --points itself stays until a value replaces it; argparse reports one without
    return glued


def _out_folder(cfg: Config, args: argparse.Namespace, default: str) -> str:
    """``--out``, else ``OUTPUT_DIR/default``; checked to be a folder that can be written (``util.output_paths``)."""
    out = args.out or f"{cfg.output_dir}/{default}"
    check_output_folder(out, "--out" if args.out else "output_dir")
    return out


def _run_train(cfg: Config, args: argparse.Namespace) -> None:
    check_output_folder(cfg.output_dir, "output_dir")
    train(cfg)


def _run_eval(cfg: Config, args: argparse.Namespace) -> None:
    check_output_folder(cfg.output_dir, "output_dir")
    evaluate_checkpoint(cfg)


def _run_predict(cfg: Config, args: argparse.Namespace) -> None:
    predict(cfg, args.image, _out_folder(cfg, args, "predictions"), args.threshold)


def _run_visualize(cfg: Config, args: argparse.Namespace) -> None:
    visualize(
        cfg,
        args.image,
        _out_folder(cfg, args, "visualize"),
        args.threshold,
        args.top_k,
        args.points,
        args.layer,
        args.by_level,
        args.by_head,
        args.query_level,
    )


def _run_export(cfg: Config, args: argparse.Namespace) -> None:
    out = args.out or f"{cfg.output_dir}/model.onnx"
    check_output_file(out, "--out" if args.out else "output_dir")
    path = export_checkpoint(cfg, out, args.exporter, args.attention)
    print(f"wrote {path}")


def _run_convert(cfg: Config, args: argparse.Namespace) -> None:
    (check_output_file if args.from_hf else check_output_folder)(args.out, "--out")
    convert(cfg, args.from_hf, args.to_hf, args.out)


def _config_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--config", help="YAML config file (default: the built-in defaults of util/config.py)")
    flags.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, values read as YAML"
    )
    return flags


def _image_flags(default_out: str) -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--image", nargs="+", required=True, metavar="IMAGE", help="image files")
    flags.add_argument("--out", default=None, help=f"output folder (default: OUTPUT_DIR/{default_out})")
    flags.add_argument(
        "--threshold", type=parse_score, default=0.5, help="lowest score drawn and written, in [0, 1] (default 0.5)"
    )
    return flags


def _add_visualize_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top-k", type=whole_number_at_least(1), default=4, help="decoder panels for the best K detections (default 4)"
    )
    parser.add_argument(
        "--points",
        nargs="+",
        action="extend",
        type=parse_point,
        default=None,
        metavar="X,Y",
        help="encoder query pixels of the original image (default: the detections' centres); "
        "negative values as -100,-100 or --points=-100,-100",
    )
    parser.add_argument(
        "--layer", type=int, default=-1, help="encoder and decoder layer to show (default -1: the last)"
    )
    parser.add_argument("--by-level", action="store_true", help="also a panel per feature level")
    parser.add_argument("--by-head", action="store_true", help="also a panel per attention head")
    parser.add_argument(
        "--query-level",
        type=whole_number_at_least(0),
        default=0,
        help="feature level whose cell at each point is the encoder query (default 0: the finest)",
    )


def build_parser() -> argparse.ArgumentParser:
    """``python main.py {train,eval,predict,visualize,export,convert} ...``; each command with only its own flags."""
    parser = argparse.ArgumentParser(
        prog="python main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{train,eval,predict,visualize,export,convert}"
    )
    config = _config_flags()
    commands.add_parser(
        "train", parents=[config], allow_abbrev=False, help="train (or resume, or fine-tune) on a COCO-layout set"
    ).set_defaults(run=_run_train)
    commands.add_parser(
        "eval", parents=[config], allow_abbrev=False, help="COCO evaluation of the checkpoint --opts resume=PATH"
    ).set_defaults(run=_run_eval)
    commands.add_parser(
        "predict",
        parents=[config, _image_flags("predictions")],
        allow_abbrev=False,
        help="detections of --opts resume=PATH on images: drawn PNGs and predictions.json",
    ).set_defaults(run=_run_predict)
    visualizing = commands.add_parser(
        "visualize",
        parents=[config, _image_flags("visualize")],
        allow_abbrev=False,
        help="where the deformable attention samples: figures and a JSON per image",
    )
    _add_visualize_flags(visualizing)
    visualizing.set_defaults(run=_run_visualize)
    exporting = commands.add_parser(
        "export",
        parents=[config],
        allow_abbrev=False,
        help="the detector of --opts resume=PATH as ONNX (logits and boxes; dynamic batch and image size)",
    )
    exporting.add_argument("--out", default=None, help="the .onnx file (default: OUTPUT_DIR/model.onnx)")
    exporting.add_argument(
        "--exporter", choices=EXPORTERS, default="dynamo", help="torch.onnx's exporter (engine/export.py)"
    )
    exporting.add_argument(
        "--attention",
        choices=tuple(ATTENTIONS),
        default="gridsample",
        help="the attention's ONNX ops: GridSample (runs everywhere) or DeformConv (onnxruntime: samples 2x faster)",
    )
    exporting.set_defaults(run=_run_export)
    converting = commands.add_parser(
        "convert",
        parents=[config],
        allow_abbrev=False,
        help="a Hugging Face hub folder to our checkpoint (--from-hf), or ours to a hub folder (--to-hf)",
    )
    direction = converting.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR_OR_FILE", help="a downloaded hub folder or its weights file")
    direction.add_argument("--to-hf", metavar="CHECKPOINT", help="our checkpoint (with the --config / --opts it had)")
    converting.add_argument("--out", required=True, help="--from-hf: the checkpoint to write; --to-hf: the folder")
    converting.set_defaults(run=_run_convert)
    return parser


def user_message(error: UserError) -> str:
    """The message of ``error``; one raised in a data-loader worker arrives with the worker's traceback, of which
    only the last line (``util.errors.UserError: ...``) is the user's business."""
    message = str(error)
    if message.startswith("Caught ") and "Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status: 0 done, 1 a run that stopped or partly failed (training diverged,
    images that could not be read), 2 a user mistake, 130 interrupted (Ctrl-C)."""
    args = build_parser().parse_args(glue_point_values(sys.argv[1:] if argv is None else argv))
    # warnings (e.g. boxes a data set drops) on stderr, from the first process alone under torchrun
    logging.basicConfig(
        format="%(levelname)s: %(message)s",
        level=logging.WARNING if os.environ.get("RANK", "0") == "0" else logging.ERROR,
    )
    try:
        cfg = load_config(args.config, overrides=args.opts)
        args.run(cfg, args)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupted:  # engine.train says where and how to resume; elsewhere nothing is kept
        print(f"error: {str(interrupted) or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
