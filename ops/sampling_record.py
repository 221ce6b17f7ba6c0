"""Record where the deformable modules sample, without changing what they compute or trace.

    with record_sampling(model) as records:
        model(images, padding_mask)
    decoder = records["transformer.decoder.layers.5.cross_attn"][-1]  # the latest forward of that module
    decoder.sampling_locations                                         # (N, Q, M, L, P, 2)

Within the block every :class:`ops.MSDeformAttn` of ``model`` appends an :class:`AttentionSampling` per forward,
and every :class:`ops.DeformConv2d`, :class:`ops.DeformRoIPool` and :class:`ops.DeformPSRoIPool` an
:class:`OffsetSampling`, to ``records[name]`` (``name`` as ``model.named_modules()`` gives it; the dict is in the
order of each module's first forward). The tensors are the very ones the module sampled with, detached, on its
device and in its dtype. Outside the block a module holds no recorder and keeps nothing: its forward reads one
attribute that is None, so ``torch.compile``, ``torch.export`` and the ONNX exporters trace the same graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

_RecordT = TypeVar("_RecordT", bound="_Record")


class _Record:
    def map_tensors(self: _RecordT, function: Callable[[torch.Tensor], torch.Tensor]) -> _RecordT:
        """A copy with ``function`` applied to every tensor (``torch.Tensor.detach``, ``lambda t: t.cpu()``, ...)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return dataclasses.replace(
            self, **{name: function(value) for name, value in values.items() if isinstance(value, torch.Tensor)}
        )


@dataclass(frozen=True)
class AttentionSampling(_Record):
    """One forward of an ``MSDeformAttn``: where each query sampled and how strongly.

    Attributes:
        sampling_locations: (N, Lq, M, L, P, 2) (x, y) in [0, 1] of each padded level map.
        attention_weights: (N, Lq, M, L, P), for each query and head summing to 1 over levels and points.
        reference_points: (N, Lq, L, 2) points or (N, Lq, L, 4) boxes (cx, cy, w, h) on each padded level.
        spatial_shapes: (L, 2) int64 rows (H, W).
        level_start_index: (L,) int64.
        padding_mask: (N, S) bool, True on padding of the flattened levels, or None (no padding).
    """

    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor
    reference_points: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    padding_mask: torch.Tensor | None


@dataclass(frozen=True)
class OffsetSampling(_Record):
    """One forward of a deformable convolution or RoI pooling: the offsets (and v2 masks) it predicted.

    Attributes:
        offset: ``DeformConv2d`` (B, 2 G k k, H_out, W_out) as (dy, dx) per offset group and tap, in input
            cells; RoI pooling (K, 2, kh, kw) as (dx_hat, dy_hat) per bin, in units of gamma * the RoI's size.
        mask: the modulation in [0, 1], (B, G k k, H_out, W_out) or (K, 1, kh, kw); None without (v1).
        input_size: (H, W) of the feature map the module read.
    """

    offset: torch.Tensor
    mask: torch.Tensor | None
    input_size: tuple[int, int]


Recorder = Callable[[AttentionSampling | OffsetSampling], None]


class RecordsSampling:
    """Mixed into the modules :func:`record_sampling` records. ``sampling_recorder`` is None except within its
    block; a forward that sampled calls it (when set) with what it sampled."""

    sampling_recorder: Recorder | None = None


@contextlib.contextmanager
def record_sampling(model: nn.Module) -> Iterator[dict[str, list[AttentionSampling | OffsetSampling]]]:
    """Within the block, every forward of a deformable module of ``model`` (``model`` itself included) appends
    what it sampled to ``records[name]``; the recorders are removed on leaving the block, also on an error.

    Raises RuntimeError when a module of ``model`` is already being recorded (a nested block)."""
    modules = [(name, module) for name, module in model.named_modules() if isinstance(module, RecordsSampling)]
    busy = [name or type(module).__name__ for name, module in modules if module.sampling_recorder is not None]
    if busy:
        raise RuntimeError(f"{busy} are already being recorded: record_sampling blocks cannot nest")
    records: dict[str, list[AttentionSampling | OffsetSampling]] = {}

    def recorder(name: str) -> Recorder:
        def append(sampling: AttentionSampling | OffsetSampling) -> None:
            records.setdefault(name, []).append(sampling.map_tensors(torch.Tensor.detach))  # no graph kept alive

        return append

    try:
        for name, module in modules:
            module.sampling_recorder = recorder(name)
        yield records
    finally:
        for _, module in modules:
            module.__dict__.pop("sampling_recorder", None)  # back to the class's None
