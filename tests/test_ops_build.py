"""Kernel builds: the CUDA source compiles where nvcc is, and a compile error surfaces as KernelBuildError."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ops import build

CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
HAS_NVCC = Path(CUDA_HOME, "bin", "nvcc").exists() or shutil.which("nvcc") is not None


@pytest.mark.slow  # about 100 s: nvcc compiles the CUDA kernel unless cached
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not installed")
def test_cuda_kernel_compiles_with_nvcc():
    build.load_cuda_kernel()  # raises KernelBuildError with the compiler's message if it does not compile


@pytest.mark.slow  # 10-24 s: a compile against torch's headers
def test_compile_error_is_raised_as_kernel_build_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#include <torch/library.h>\nint this_does_not_compile( {\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with pytest.raises(build.KernelBuildError, match="building the test kernel of ms_deform_attn failed"):
        build._build("test", [broken], verbose=False)
