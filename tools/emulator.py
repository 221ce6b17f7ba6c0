"""The global-memory traffic of the CUDA kernels, counted by their host emulation (``ops/csrc/cuda_emulation.h``).

    python -m tools.emulator                                  # every benchmark case, float32 and bfloat16, sm_80/90
    python -m tools.emulator --cases encoder --dtypes float32 --queries 64

For each kernel launch the emulation counts, per kind of access (load, store, atomic) and tensor, the warp
instructions, the lane operations, the distinct 32-byte sectors each warp instruction touches (summed: the unit in
which L1 and L2 serve requests and the L2 performs atomics) and the bytes moved. No GPU is needed, but every
thread runs on the CPU, so a case runs on a random subset of its queries (``--queries`` per batch item) with its
full value maps, and the table gives counts per sample (one (batch, query, head, level, point)) and the totals
scaled to the whole case. ``access_counts`` is the function the tests and other tools call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ops import build
from ops.cases import CASES, make_inputs

ARGUMENTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def emulated_ops(mutants: bool = False):
    """The emulated kernels' op namespace (``torch.ops.deformable_detr_emulated[_mutants]``), built on first use."""
    build.load_emulated_kernel(mutants=mutants)
    return getattr(torch.ops, build.MUTANT_LIBRARY if mutants else build.EMULATED_LIBRARY)


def access_counts(run: Callable[[], object], mutants: bool = False) -> dict[str, int]:
    """What the emulated launches inside ``run()`` added to the counters: ``launches``, ``warp_operations`` and
    ``<kind>.<tensor>.<measure>`` for kind load, store or atomic, tensor an argument's name (``grad_value``, ...)
    and measure instructions, lanes, sectors or bytes."""
    ops = emulated_ops(mutants)
    before = dict(ops.counters())
    run()
    after = dict(ops.counters())
    return {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}


@dataclass(frozen=True)
class Traffic:
    """One kind of access summed over tensors: warp instructions, lane operations, 32-byte sectors, bytes."""

    instructions: int = 0
    lanes: int = 0
    sectors: int = 0
    bytes: int = 0

    @property
    def bytes_per_sector(self) -> float:
        """32 when every sector an instruction touches is used whole."""
        return self.bytes / self.sectors if self.sectors else 0.0


def traffic(counts: dict[str, int], kind: str, tensor: str | None = None) -> Traffic:
    """The ``kind`` (load, store, atomic) accesses of ``counts``, to ``tensor`` or to any."""
    totals = {"instructions": 0, "lanes": 0, "sectors": 0, "bytes": 0}
    for key, value in counts.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == kind and tensor in (None, parts[1]):
            totals[parts[2]] += value
    return Traffic(**totals)


def subset_of_queries(inputs: dict[str, torch.Tensor], queries: int, seed: int) -> dict[str, torch.Tensor]:
    """The same problem on ``queries`` randomly chosen queries (all of them if there are fewer)."""
    total = inputs["sampling_locations"].shape[1]
    if queries >= total:
        return inputs
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:queries].sort().values
    subset = dict(inputs)
    for name in ("sampling_locations", "attention_weights"):
        subset[name] = inputs[name][:, chosen].contiguous()
    return subset


def measure(inputs: dict[str, torch.Tensor], sm: int) -> dict[str, dict[str, int]]:
    """{"forward": counts, "backward": counts} of one emulated forward and one full backward on ``inputs``."""
    ops = emulated_ops()
    ops.set_architecture(sm)
    args = [inputs[name] for name in ARGUMENTS]
    output = ops.ms_deform_attn_forward(*args)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1)).to(output.dtype)
    return {
        "forward": access_counts(lambda: ops.ms_deform_attn_forward(*args)),
        "backward": access_counts(lambda: ops.ms_deform_attn_backward(grad_output, *args, [True, True, True])),
    }


def table(cases: list[str], dtypes: list[torch.dtype], archs: list[int], queries: int) -> list[str]:
    lines = [
        "| case | dtype | sm | kernel | load sectors / sample | atomic instr / sample | atomic lanes / sample "
        "| atomic sectors / sample | bytes / atomic sector | atomic sectors, whole case (M) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in cases:
        for dtype in dtypes:
            full = make_inputs(CASES[name], torch.device("cpu"), dtype)
            inputs = subset_of_queries(full, queries, seed=0)
            samples = inputs["attention_weights"].numel()
            scale = full["attention_weights"].numel() / samples
            for sm in archs:
                for kernel, counts in measure(inputs, sm).items():
                    load, atomic = traffic(counts, "load"), traffic(counts, "atomic")
                    lines.append(
                        f"| {name} | {str(dtype).replace('torch.', '')} | {sm} | {kernel} "
                        f"| {load.sectors / samples:.2f} | {atomic.instructions / samples:.3f} "
                        f"| {atomic.lanes / samples:.2f} | {atomic.sectors / samples:.2f} "
                        f"| {atomic.bytes_per_sector:.1f} | {atomic.sectors * scale / 1e6:.1f} |"
                    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.emulator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90], choices=[80, 90])
    parser.add_argument("--queries", type=int, default=64, help="queries per batch item emulated (default 64)")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    print("\n".join(table(args.cases, dtypes, args.archs, args.queries)))


if __name__ == "__main__":
    main()
