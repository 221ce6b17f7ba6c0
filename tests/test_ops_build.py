"""Kernel builds: the CUDA source compiles where nvcc is, a compile error surfaces as KernelBuildError, a failed
build is not run again in the same process, and ``python -m ops.build`` compiles its kernels side by side."""

from __future__ import annotations

import os
import shutil
import threading
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


def fake_loaders(monkeypatch, behaviour):
    """Replace the kernels' loaders by ``behaviour(name)``; -> the names in the order the loaders ran."""
    calls = []

    def loader(name):
        def load(verbose=False, mutants=False):
            calls.append(name + (" mutants" if mutants else ""))
            behaviour(name + (" mutants" if mutants else ""))

        return load

    for name in ("cpu", "cuda", "emulated"):
        monkeypatch.setattr(build, f"load_{name}_kernel", loader(name))
    return calls


def test_build_command_compiles_the_kernels_side_by_side(monkeypatch, capsys):
    # every loader waits until two have started: run one after another, the first would time out
    both_started = threading.Barrier(2, timeout=10)
    calls = fake_loaders(monkeypatch, lambda name: both_started.wait())
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert build.main(["--cuda", "--emulated"]) == 0
    assert sorted(calls) == ["cpu", "cuda", "emulated", "emulated mutants"]
    assert capsys.readouterr().out.splitlines() == [
        f"{name} kernel: built and loaded" for name in ("cuda", "cpu", "emulated", "emulated mutants")
    ]


def test_build_command_reports_each_failure_and_exits_1(monkeypatch, capsys):
    def behaviour(name):
        if name == "emulated":
            raise build.KernelBuildError("building the emulated kernel of ms_deform_attn failed: no compiler")

    calls = fake_loaders(monkeypatch, behaviour)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build.main(["--emulated"]) == 1
    assert sorted(calls) == ["cpu", "emulated", "emulated mutants"]  # no GPU, no --cuda: no CUDA build
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["cpu kernel: built and loaded", "emulated mutants kernel: built and loaded"]
    assert "emulated kernel: FAILED\nbuilding the emulated kernel of ms_deform_attn failed: no compiler" in captured.err
