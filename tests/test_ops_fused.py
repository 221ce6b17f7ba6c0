"""ops.fused: the oneDNN calls give what the plain ops give, and the plain ops run wherever oneDNN refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ops import fused

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _inputs(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=generator).to(dtype)
    weight = torch.randn(40, 24, generator=generator).to(dtype) / 5
    bias = torch.randn(40, generator=generator).to(dtype)
    residual = torch.randn(2, 7, 40, generator=generator).to(dtype)
    image = torch.randn(1, 6, 9, 11, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1).to(dtype)
    image_residual = torch.randn(1, 8, 5, 6, generator=generator).to(dtype)
    return x, weight, bias, residual, image, conv, image_residual


def _check(dtype: torch.dtype) -> None:
    x, weight, bias, residual, image, conv, image_residual = _inputs(dtype)
    plain = F.linear(x.double(), weight.double(), bias.double())
    plain_conv = F.conv2d(image.double(), conv.weight.double(), conv.bias.double(), stride=2, padding=1)
    with torch.no_grad():
        results = [
            (fused.linear(x, weight, bias), plain),
            (fused.linear(x, weight, bias, relu=True), plain.relu()),
            (fused.linear(x, weight, bias, residual=residual), plain + residual.double()),
            (fused.conv2d(image, conv, relu=True), plain_conv.relu()),
            (fused.conv2d(image, conv, residual=image_residual), plain_conv + image_residual.double()),
        ]
    for got, wanted in results:
        assert got.dtype == dtype and got.shape == wanted.shape
        scale = wanted.abs().max().item()
        assert (got.double() - wanted).abs().max().item() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_give_the_plain_results(dtype: torch.dtype) -> None:
    _check(dtype)


@pytest.mark.parametrize("rows_per_thread", [3, 14, 0])
def test_float32_linear_in_row_blocks_gives_the_plain_results(
    monkeypatch: pytest.MonkeyPatch, rows_per_thread: int
) -> None:
    # 14 rows (2 x 7) in blocks of 3 per thread (the last one short on 1 or 2 threads) or in one (14 per thread:
    # the oneDNN call, as 0 is)
    monkeypatch.setattr(fused, "FLOAT32_ROWS_PER_THREAD", rows_per_thread)
    _check(torch.float32)
    x, weight, _, residual, *_ = _inputs(torch.float32)
    with torch.no_grad():
        got = fused.linear(x, weight, None, residual=residual)
    wanted = F.linear(x.double(), weight.double()) + residual.double()
    assert (got.double() - wanted).abs().max().item() <= TOLERANCE[torch.float32] * wanted.abs().max().item()


def test_bfloat16_runs_the_plain_ops_where_onednn_has_no_bfloat16(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # a CPU without AVX-512 BW/VL/DQ or AVX-NE-CONVERT (e.g. an AVX2 AMD EPYC): oneDNN's fused ops refuse bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    fused.onednn_dtype.cache_clear()  # it asks torch once per dtype
    request.addfinalizer(fused.onednn_dtype.cache_clear)  # the real answer again after the patch is undone
    assert not fused.onednn_dtype(torch.bfloat16) and fused.onednn_dtype(torch.float32)

    def refuse(*args, **kwargs):
        raise RuntimeError("oneDNN called with bfloat16 on a CPU that has none")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", refuse)
    _check(torch.bfloat16)
