"""Linear layers and convolutions with their bias, ReLU and residual sum in one oneDNN call, for inference on the CPU.

``F.linear`` on the CPU writes the bias into its output before the matrix product, and a ``relu`` or a residual
``+`` after it is one more pass over the output each, as slow in bfloat16 as the product itself for the
feed-forward's (S, 1024) activations. oneDNN applies them in the product's epilogue: ``torch.ops.mkldnn``'s
``_linear_pointwise`` and ``_convolution_pointwise``, the ops that ``torch.compile``'s freezing passes emit, called
here directly. Each function falls back to the plain ops, same result, where oneDNN cannot run them: another device,
a dtype other than float32 and bfloat16, bfloat16 on a CPU where oneDNN has no bfloat16 (one without AVX-512 BW/VL/DQ
or AVX-NE-CONVERT: the fused ops refuse it there, the plain ones run), a torch built without oneDNN, an autograd
graph to record (the fused ops have no derivative), and while a graph is traced or exported (the plain ops are what
an exporter knows). A float32 linear of many rows on a CPU where torch runs its AVX2 kernels goes instead in blocks
of rows through torch's BLAS, its epilogue added in cache (``FLOAT32_ROWS_PER_THREAD``): faster there than oneDNN.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Rows of a float32 input per thread and matrix product in :func:`linear` (0: one oneDNN call). Where torch runs its
# AVX2 kernels: blocks of 2048 rows on 2 threads through torch's BLAS, the bias, ReLU or residual added while the
# block is in cache, ran 1-35% faster than one fused oneDNN product of the encoder's 6375 to 22223 rows on a 2-core
# AVX2 EPYC (benchmarks/RESULTS.md). Blocks grow with the threads, so that each thread's share stays what was
# measured; CPUs with AVX-512 keep the oneDNN call (not measured there).
FLOAT32_ROWS_PER_THREAD = 1024 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 0


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def inference_only(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on ``tensors`` (None is skipped) records no gradient and is not being traced or exported: it
    may then write in place or call ops that have no derivative."""
    gradient = torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors)
    return not gradient and not _tracing()


@functools.cache
def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused ops take ``dtype`` on this CPU: float32 wherever oneDNN is built in, bfloat16 where
    torch also reports oneDNN's bfloat16 support. Asked once per dtype (every fused call asks)."""
    if dtype not in ONEDNN_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_runs(*tensors: torch.Tensor | None) -> bool:
    """Whether the fused oneDNN ops can take ``tensors`` (the input, the weight, ...; None is skipped): all on the
    CPU in one dtype that :func:`onednn_dtype` accepts, and :func:`inference_only`."""
    present = [tensor for tensor in tensors if tensor is not None]
    return (
        all(tensor.device.type == "cpu" and tensor.dtype == present[0].dtype for tensor in present)
        and onednn_dtype(present[0].dtype)
        and inference_only(*present)
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``relu(x @ weight.T + bias)`` (``relu``) or ``residual + x @ weight.T + bias`` (``residual``, of the output's
    shape), in one oneDNN call where it runs (see :func:`onednn_runs`).

    Args:
        x: (..., K); weight: (N, K); bias: (N,) or None.

    Returns:
        (..., N) in x's dtype.
    """
    if relu and residual is not None:
        raise ValueError("linear fuses a ReLU or a residual sum, not both")
    if not onednn_runs(x, weight, bias, residual):
        output = F.linear(x, weight, bias)
        if residual is not None:
            return residual + output
        return output.relu_() if relu else output
    block = FLOAT32_ROWS_PER_THREAD * torch.get_num_threads()
    if x.dtype == torch.float32 and 0 < block < x.numel() // x.shape[-1]:
        return _linear_in_row_blocks(x, weight, bias, relu, residual, block)
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def _linear_in_row_blocks(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    residual: torch.Tensor | None,
    block_rows: int,
) -> torch.Tensor:
    """:func:`linear` as one matrix product per block of ``block_rows`` rows, written into the output in place, its
    bias (after a residual), ReLU added to each block while it is in cache. x (..., K) -> (..., N)."""
    rows = x.reshape(-1, x.shape[-1])
    output = rows.new_empty(rows.shape[0], weight.shape[0])
    added = residual.reshape(-1, weight.shape[0]) if residual is not None else None
    for start in range(0, rows.shape[0], block_rows):
        block = slice(start, start + block_rows)
        out = output[block]
        if added is not None:
            torch.addmm(added[block], rows[block], weight.t(), out=out)
            if bias is not None:
                out.add_(bias)
        elif bias is not None:
            torch.addmm(bias, rows[block], weight.t(), out=out)
        else:
            torch.mm(rows[block], weight.t(), out=out)
        if relu:
            out.relu_()
    return output.view(*x.shape[:-1], weight.shape[0])


def conv2d(
    x: torch.Tensor, conv: nn.Module, *, relu: bool = False, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv(x)``, plus ``residual`` (the output's shape) when given, then a ReLU when ``relu``: one oneDNN call
    where it runs (see :func:`onednn_runs`; an ``nn.Conv2d`` with zero padding: any other module, e.g. a
    ``DeformConv2d``, runs as it is, followed by the plain sum and ReLU).

    Args:
        x: (B, C_in, H, W); conv: the convolution module.

    Returns:
        (B, C_out, H', W'), channels-last when x is.
    """
    runs = isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    if not (runs and onednn_runs(x, conv.weight, conv.bias, residual)):
        output = nn.Conv2d.forward(conv, x) if isinstance(conv, nn.Conv2d) else conv(x)  # a subclass may call here
        if residual is not None:
            output = output + residual
        return output.relu_() if relu else output
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    unary = "relu" if relu else None
    if residual is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, conv.weight, conv.bias, *geometry, "add", 1.0, unary, [], None
        )
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *geometry, unary or "none", [], "")
