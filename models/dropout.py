"""Dropout whose CPU mask costs a fraction of torch's: the transformer layers' ``dropout1`` .. ``dropout4``.

torch's CPU dropout draws one double-precision uniform number per element (``bernoulli_``), serially from its
Mersenne Twister: about 7 ns an element, 1.6 s of a 5.8 s R50 training step (``benchmarks/RESULTS.md``). Here
each 64-bit draw of the same generator is cut into four 16-bit numbers u, uniform on [0, 2^16), and an element
is kept when u >= round(p * 2^16):

    keep probability 1 - p',  p' = round(p * 2^16) / 2^16  (|p' - p| <= 2^-17);  kept elements scaled 1 / (1 - p')

so the output's expectation is the input (up to the input dtype's rounding of the scale, as in torch). A quarter
of the draws, and the scaled mask written in one pass from them. On other devices torch's fused dropout runs.
Seeded by ``torch.manual_seed`` like torch's: the same seed gives the same masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16  # the values of one 16-bit slice of a draw
SLICES = 4  # 16-bit slices in one 64-bit draw


def drop_levels(p: float) -> int:
    """How many of the :data:`LEVELS` values of a slice drop their element: round(p * 2^16), at most 2^16 - 1."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(round(p * LEVELS), LEVELS - 1)


def scaled_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A CPU tensor of ``shape`` in ``dtype``: 0 where an element drops (probability p', see the module), else
    1 / (1 - p'); independent elements, drawn from ``generator`` (torch's default one when None)."""
    count, dropped = math.prod(shape), drop_levels(p)
    draws = torch.empty(math.ceil(count / SLICES), dtype=torch.int64)
    draws.random_(-(2**63), None, generator=generator)  # every bit uniform (the default range leaves the top bit 0)
    # As int16 the slices are uniform on [-2^15, 2^15): the top LEVELS - dropped of these values keep.
    slices = draws.view(torch.int16)[:count].view(shape)
    mask = torch.ge(slices, dropped - LEVELS // 2, out=torch.empty(shape, dtype=dtype))
    return mask.mul_(LEVELS / (LEVELS - dropped))


def dropout(input: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout(input, p, training)``, with the mask of :func:`scaled_keep_mask` on the CPU."""
    if not training or p == 0.0 or input.device.type != "cpu" or not input.is_floating_point():
        return F.dropout(input, p, training)
    return input * scaled_keep_mask(input.shape, p, input.dtype)


class Dropout(nn.Module):
    """``nn.Dropout(p)`` through :func:`dropout`: no parameters, so checkpoints are unchanged."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        drop_levels(p)  # refuse a p outside [0, 1) when the model is built
        self.p = p

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
