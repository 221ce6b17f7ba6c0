"""Training-step time on the CPU, float32 against bfloat16 autocast (``amp``), and with a ``dropout`` above 0 the
dropout mask of ``models.dropout`` against torch's (``nn.Dropout``, a ``bernoulli_`` draw per element); prints a
Markdown table.

    python -m benchmarks.train_step --config configs/deformable_detr.yaml --size 800 1066 --batch 1
    python -m benchmarks.train_step --config configs/demo_shapes.yaml --size 96 128 --batch 8

One step is what ``engine.train.train_one_epoch`` does per batch: ``forward_losses`` (forward under autocast
for ``amp``, the set criterion on float32 outputs), backward, the fused AdamW step of
``engine.optim.build_optimizer``. Random weights and images, five random boxes per image, a fixed input size (so
the step is timed after oneDNN has built its kernels for that size: a real epoch with many image sizes also pays
for building them, see ``benchmarks/RESULTS.md``). Each row runs in a fresh process; the median of ``--repeats``
steps after ``--warmup``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.harness import describe_machine, in_fresh_process
from datasets import Batch
from engine.amp import prepare_for_training, resolve_amp
from engine.optim import build_optimizer
from engine.train import forward_losses
from models import build_model
from models.dropout import Dropout
from util.config import load_config
from util.timing import median_ms

AMP_MODES = ("none", "bfloat16")
DROPOUT_MASKS = ("torch", "ours")  # nn.Dropout's bernoulli_ mask, models.dropout's


def use_torch_dropout(model: nn.Module) -> None:
    """Replace every ``models.dropout.Dropout`` of ``model`` by torch's ``nn.Dropout`` of the same p, in place."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))


def measure(
    config: str,
    overrides: list[str],
    amp: str,
    batch: int,
    size: tuple[int, int],
    repeats: int,
    warmup: int,
    dropout_mask: str = "ours",
):
    """-> median milliseconds of one training step of ``config`` on the CPU with ``amp`` ("none" or "bfloat16") and
    ``dropout_mask`` (one of :data:`DROPOUT_MASKS`)."""
    torch.manual_seed(0)
    cfg = load_config(config, overrides=["pretrained_backbone=false", *overrides])
    device = torch.device("cpu")
    model, criterion, _ = build_model(cfg)
    if dropout_mask == "torch":
        use_torch_dropout(model)
    model.train()
    criterion.train()
    prepare_for_training(model, amp, device)
    optimizer = build_optimizer(model, cfg)
    targets = [
        {"labels": torch.randint(0, cfg.num_classes, (5,)), "boxes": torch.rand(5, 4) * 0.5 + 0.25}
        for _ in range(batch)
    ]
    inputs = Batch(torch.randn(batch, 3, *size), torch.zeros(batch, *size, dtype=torch.bool), targets)

    def step() -> None:
        _, loss = forward_losses(model, criterion, inputs, amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_ms(step, device, repeats, warmup)


def run(config: str, overrides: list[str], batch: int, size: tuple[int, int], repeats: int, warmup: int) -> list[str]:
    device = torch.device("cpu")
    dropout = load_config(config, overrides=overrides).dropout
    masks = DROPOUT_MASKS if dropout > 0 else ("ours",)
    lines = [
        f"\ncpu: {describe_machine(device)}; {config} {' '.join(overrides)}, batch {batch} at {size[0]}x{size[1]}, "
        f"dropout {dropout}; amp=auto here is {resolve_amp('auto', device)}",
        "| amp | dropout mask | step ms | images/s | vs the first row |",
        "|---|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    baseline = None
    for amp in AMP_MODES:
        for mask in masks:
            milliseconds = in_fresh_process(measure, config, overrides, amp, batch, size, repeats, warmup, mask)
            baseline = baseline or milliseconds
            row = (
                f"| {amp} | {mask} | {milliseconds:.0f} | {batch * 1e3 / milliseconds:.2f} | "
                f"{baseline / milliseconds:.2f}x |"
            )
            lines.append(row)
            print(row, flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/deformable_detr.yaml")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides, key=value")
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    run(args.config, args.opts, args.batch, tuple(args.size), args.repeats, args.warmup)


if __name__ == "__main__":
    main()
