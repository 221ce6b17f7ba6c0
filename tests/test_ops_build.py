"""Kernel builds: the CUDA source compiles where nvcc is, a compile error surfaces as KernelBuildError, and a
failed build is not run again in the same process."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from ops import build, functional

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


def test_failed_build_is_attempted_once_per_process_for_auto(monkeypatch):
    attempts = []

    def failing_build(kind, sources, verbose, defines=()):
        attempts.append(kind)
        raise build.KernelBuildError(f"building the {kind} kernel of ms_deform_attn failed: no compiler")

    monkeypatch.setattr(build, "_build", failing_build)
    monkeypatch.setattr(build, "_outcomes", {})
    monkeypatch.setattr(functional, "_kernel_loaded", {})
    monkeypatch.setattr(functional, "_warned_fallback", set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        backends = [functional.resolve_backend("auto", torch.device("cpu"), torch.float32) for _ in range(3)]
    assert backends == ["pytorch"] * 3
    assert attempts == ["cpu"]


def test_explicit_backend_after_a_failed_build_raises_the_first_error(monkeypatch):
    # not a KernelBuildError: a bug
    monkeypatch.setattr(build, "_build", lambda kind, sources, verbose, defines=(): 1 / 0)
    monkeypatch.setattr(build, "_outcomes", {"cpu": build.KernelBuildError("building the cpu kernel failed: boom")})
    monkeypatch.setattr(functional, "_kernel_loaded", {})
    with pytest.raises(build.KernelBuildError, match="boom .not retried in this process"):
        functional.resolve_backend("cpu", torch.device("cpu"))
