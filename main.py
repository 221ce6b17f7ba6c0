"""Deformable DETR command line.

    python main.py train|eval|predict|visualize --config FILE --opts key=value ...

Runs the same under ``torchrun``. The commands arrive with the training pipeline; today this file only
reports that, so that scripts calling it fail with a clear message instead of an import error.
"""
from __future__ import annotations

import argparse
import sys

COMMANDS = ("train", "eval", "predict", "visualize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python main.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides as key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"'{args.command}' is not available yet: this version provides the deformable attention op "
          "(ops/); see README.md.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
