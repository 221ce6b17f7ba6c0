"""The backend "auto" prefers: DETR_MSDA_BACKEND, then the one python -m ops.check remembered, then the default."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from ops import backend_cache, functional
from ops.build import KernelBuildError
from util.errors import UserError

CPU = torch.device("cpu")
ORIGINAL_CACHE_FILE = backend_cache.cache_file  # before conftest points it at an empty folder


@pytest.fixture
def cache_path(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "msda_backends.json"
    monkeypatch.setattr(backend_cache, "cache_file", lambda: path)
    return path


def test_cache_file_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ORIGINAL_CACHE_FILE() == tmp_path / "deformable_detr" / "msda_backends.json"


def test_cache_file_defaults_to_dot_cache_in_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ORIGINAL_CACHE_FILE() == tmp_path / ".cache" / "deformable_detr" / "msda_backends.json"


def test_auto_uses_the_remembered_backend_for_that_dtype_only(cache_path):
    backend_cache.remember(CPU, torch.float32, "pytorch", {})
    assert functional.resolve_backend("auto", CPU, torch.float32) == "pytorch"
    assert functional.resolve_backend("auto", CPU, torch.float64) == "cpu"


def test_remember_keeps_other_entries_and_leaves_no_temporary_file(cache_path):
    backend_cache.remember(CPU, torch.float32, "pytorch", {"forward_ms": {"tiny": 1.0}})
    backend_cache.remember(CPU, torch.float64, "cpu", {})
    choices = json.loads(cache_path.read_text())["choices"]
    assert {entry["backend"] for entry in choices.values()} == {"pytorch", "cpu"}
    assert choices[backend_cache.cache_key(CPU, torch.float32)]["forward_ms"] == {"tiny": 1.0}
    assert sorted(path.name for path in cache_path.parent.iterdir()) == ["msda_backends.json"]


def test_environment_variable_overrides_the_remembered_backend(cache_path, monkeypatch):
    backend_cache.remember(CPU, torch.float32, "cpu", {})
    monkeypatch.setenv("DETR_MSDA_BACKEND", "pytorch")
    assert functional.resolve_backend("auto", CPU, torch.float32) == "pytorch"
    assert functional.resolve_backend("cpu", CPU, torch.float32) == "cpu"  # an explicit backend still wins


def test_environment_variable_naming_another_devices_backend_is_passed_over(monkeypatch):
    monkeypatch.setenv("DETR_MSDA_BACKEND", "cuda")
    assert functional.resolve_backend("auto", CPU, torch.float32) == "cpu"


def test_environment_variable_with_an_unknown_backend_is_an_error(monkeypatch, small_problem):
    monkeypatch.setenv("DETR_MSDA_BACKEND", "fastest")
    value = small_problem["value"]
    with pytest.raises(UserError, match="DETR_MSDA_BACKEND='fastest' names no backend.*set it to one of"):
        functional.resolve_backend("auto", value.device, value.dtype)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"version": 1, "choices": []}',
        '{"version": 99, "choices": {}}',
        '{"version": 1, "choices": {"k": 3}}',
    ],
)
def test_corrupt_cache_file_is_ignored_with_one_warning(cache_path, content):
    cache_path.write_text(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends = [functional.resolve_backend("auto", CPU, torch.float32) for _ in range(2)]
    assert backends == ["cpu", "cpu"]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and f"ignoring the ms_deform_attn backend cache {cache_path}" in messages[0]


def test_remember_replaces_a_corrupt_cache_file(cache_path):
    cache_path.write_text("{not json")
    backend_cache.remember(CPU, torch.float32, "pytorch", {})
    assert functional.resolve_backend("auto", CPU, torch.float32) == "pytorch"


def test_remembered_backend_of_another_device_is_passed_over(cache_path):
    backend_cache.remember(CPU, torch.float32, "cuda", {})  # e.g. a file edited by hand
    assert functional.resolve_backend("auto", CPU, torch.float32) == "cpu"


def test_remembered_kernel_that_cannot_be_built_falls_back_with_one_warning(cache_path, monkeypatch):
    def broken(kind):
        raise KernelBuildError(f"building the {kind} kernel failed: no compiler")

    backend_cache.remember(CPU, torch.float32, "cpu", {})
    monkeypatch.setattr(functional, "_load_kernel", broken)
    monkeypatch.setattr(functional, "_warned_fallback", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends = [functional.resolve_backend("auto", CPU, torch.float32) for _ in range(2)]
    assert backends == ["pytorch", "pytorch"]
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
