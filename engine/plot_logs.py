"""Loss and AP curves of training runs, from their ``log.txt``.

    python -m engine.plot_logs outputs/demo_shapes [outputs/other_run ...] [--out curves.png]

Draws, per run, the training loss and its three final-layer parts (``loss_ce``, ``loss_bbox``, ``loss_giou``)
against the epoch, and the validation AP and AP50 of the epochs that were evaluated. The PNG goes to
``--out``, by default ``curves.png`` in the first run's folder. It draws on a ``matplotlib.figure.Figure`` of its
own, without pyplot: importing or calling it leaves matplotlib's backend as it was.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from engine.run_dir import read_log

PANELS = (
    ("train_loss", "loss (weighted total)"),
    ("train_loss_ce", "loss_ce"),
    ("train_loss_bbox", "loss_bbox"),
    ("train_loss_giou", "loss_giou"),
    ("val_AP", "val AP"),
    ("val_AP50", "val AP50"),
)


def plot_logs(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Draw the :data:`PANELS` of every run in ``runs`` into one PNG at ``out``."""
    figure = Figure(figsize=(14, 7.5))
    axes = figure.subplots(2, 3)
    for run in runs:
        records = read_log(run)
        for axis, (key, title) in zip(axes.flat, PANELS):
            points = [
                (record["epoch"], record[key])
                for record in records
                if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
            ]
            if points:
                epochs, values = zip(*points)
                axis.plot(
                    epochs,
                    values,
                    marker="o" if len(points) < 30 else None,
                    markersize=3,
                    label=Path(run).name or str(run),
                )
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
    axes.flat[0].legend()
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.plot_logs", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (or their log.txt)")
    parser.add_argument("--out", default=None, help="PNG file (default: RUN/curves.png of the first run)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    first = Path(args.runs[0])
    default = (first if first.is_dir() else first.parent) / "curves.png"
    print(f"wrote {plot_logs(args.runs, args.out or default)}")


if __name__ == "__main__":
    main()
