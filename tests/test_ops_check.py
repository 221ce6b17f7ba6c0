"""python -m ops.check on the CPU, end to end on a tiny case: it checks, times, remembers, and auto follows it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root

from ops import backend_cache, check, functional

CPU = torch.device("cpu")
ORIGINAL_CACHE_FILE = backend_cache.cache_file  # before conftest points it at an empty folder
TINY_RUN = ["--device", "cpu", "--cases", "tiny", "--repeats", "1", "--bandwidth-mib", "1"]


@pytest.fixture
def xdg_cache(tmp_path, monkeypatch):
    """A fresh $XDG_CACHE_HOME, with torch's kernel builds kept where they are."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(backend_cache, "cache_file", ORIGINAL_CACHE_FILE)
    return tmp_path


def _fake_timings(fastest: str):
    def time_backend(backend, inputs, repeats, warmup):
        return (1.0, 2.0) if backend == fastest else (5.0, 10.0)

    return time_backend


def test_check_passes_and_remembers_a_correct_backend_under_xdg_cache_home(xdg_cache, capsys):
    assert check.main(TINY_RUN) == 0
    output = capsys.readouterr().out
    assert "pytorch: ok" in output and "cpu: ok" in output
    assert "| tiny | float32 | cpu |" in output and "| tiny | float32 | pytorch |" in output
    saved = json.loads((xdg_cache / "deformable_detr" / "msda_backends.json").read_text())
    entry = saved["choices"][backend_cache.cache_key(CPU, torch.float32)]
    assert entry["backend"] in ("pytorch", "cpu") and set(entry["forward_ms"]) == {"tiny"}
    assert functional.resolve_backend("auto", CPU, torch.float32) == entry["backend"]


def test_auto_follows_the_fastest_backend_check_found(xdg_cache, monkeypatch):
    monkeypatch.setattr(check.problems, "time_backend", _fake_timings("pytorch"))
    assert functional.resolve_backend("auto", CPU, torch.float32) == "cpu"
    assert check.main(TINY_RUN) == 0
    assert functional.resolve_backend("auto", CPU, torch.float32) == "pytorch"
    assert functional.resolve_backend("auto", CPU, torch.float64) == "cpu"  # not checked: the default


def test_no_save_leaves_the_cache_alone(xdg_cache, monkeypatch):
    monkeypatch.setattr(check.problems, "time_backend", _fake_timings("pytorch"))
    assert check.main([*TINY_RUN, "--no-save"]) == 0
    assert not (xdg_cache / "deformable_detr").exists()


def test_a_wrong_backend_is_reported_and_never_remembered(xdg_cache, monkeypatch, capsys):
    correct = functional.ms_deform_attn

    def cpu_off_by_a_little(*args, backend="auto"):
        output = correct(*args, backend=backend)
        return output * 1.001 if backend == "cpu" else output

    monkeypatch.setattr(functional, "ms_deform_attn", cpu_off_by_a_little)
    monkeypatch.setattr(check.problems, "time_backend", _fake_timings("cpu"))
    assert check.main(TINY_RUN) == 1
    output = capsys.readouterr().out
    assert "cpu: WRONG" in output and "pytorch: ok" in output
    assert functional.resolve_backend("auto", CPU, torch.float32) == "pytorch"


def test_a_wrong_pytorch_backend_is_reported_but_does_not_fail_the_check(xdg_cache, monkeypatch, capsys):
    correct = functional.ms_deform_attn

    def pytorch_off_by_a_little(*args, backend="auto"):
        output = correct(*args, backend=backend)
        return output * 1.001 if backend == "pytorch" else output

    monkeypatch.setattr(functional, "ms_deform_attn", pytorch_off_by_a_little)
    monkeypatch.setattr(check.problems, "time_backend", _fake_timings("pytorch"))
    assert check.main(TINY_RUN) == 0
    assert "pytorch: WRONG (output 10" in capsys.readouterr().out  # 1e-3 / 1e-4 tolerance: 10 (x tolerance)
    assert functional.resolve_backend("auto", CPU, torch.float32) == "cpu"


def test_a_crashing_kernel_fails_the_check(xdg_cache, monkeypatch, capsys):
    correct = functional.ms_deform_attn

    def cpu_crashes(*args, backend="auto"):
        if backend == "cpu":
            raise RuntimeError("illegal memory access")
        return correct(*args, backend=backend)

    monkeypatch.setattr(functional, "ms_deform_attn", cpu_crashes)
    monkeypatch.setattr(check.problems, "time_backend", _fake_timings("pytorch"))  # (Triton's interpreter: 30 s)
    assert check.main([*TINY_RUN, "--no-save"]) == 1
    assert "cpu: ERROR RuntimeError: illegal memory access" in capsys.readouterr().out


def test_a_backend_that_cannot_run_here_is_listed_and_skipped(xdg_cache, monkeypatch, capsys):
    resolve = functional.resolve_backend

    def cpu_cannot_run(backend, device, dtype=None):
        if backend == "cpu":
            raise RuntimeError("backend 'cpu' needs something this machine lacks")
        return resolve(backend, device, dtype)

    monkeypatch.setattr(functional, "resolve_backend", cpu_cannot_run)
    monkeypatch.setattr(check.problems, "time_backend", _fake_timings("pytorch"))
    assert check.main([*TINY_RUN, "--no-save"]) == 0
    output = capsys.readouterr().out
    assert "backend cpu: NOT USABLE: backend 'cpu' needs something this machine lacks" in output
    assert "| tiny | float32 | pytorch |" in output and "| tiny | float32 | cpu |" not in output


def test_a_bad_environment_variable_is_an_error_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("DETR_MSDA_BACKEND", "fastest")
    assert check.main([*TINY_RUN, "--no-save"]) == 2
    assert "error: the environment variable DETR_MSDA_BACKEND='fastest'" in capsys.readouterr().err
