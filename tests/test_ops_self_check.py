"""The first-use self-check (ops.self_check): right kernels pass once per device and are remembered, a wrong or
crashing kernel is caught, warned about once and replaced by the pytorch backend, and DETR_MSDA_SELF_CHECK=0 turns
the check off. Without a GPU: the CUDA kernels through their host emulation, the Triton kernels in the interpreter.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ops import backend_cache, build, check, comparison, functional, ms_deform_attn, self_check
from tests.conftest import make_problem, op_args

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch, tmp_path):
    """No verdict in memory, an empty cache file of this test's own."""
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.setattr(backend_cache, "cache_file", lambda: tmp_path / "msda_backends.json")
    monkeypatch.delenv(self_check.ENV_VAR, raising=False)


def _remembered(backend: str) -> bool | None:
    return backend_cache.remembered_self_check(
        backend_cache.self_check_key(CPU, backend, self_check.kernel_digest(backend))
    )


def _off_by_one_percent(kernel, *args):
    return kernel(*args) * 1.01


def _crashing(*args):
    raise RuntimeError("an illegal memory access was encountered")


def test_emulated_cuda_kernels_pass_and_the_verdict_is_remembered():
    from tests.test_ops_emulated import _emulated_autograd

    build.load_emulated_kernel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing check warns about nothing
        assert self_check.confirmed("cuda", CPU, _emulated_autograd) == "cuda"
    assert _remembered("cuda") is True


def test_emulated_cuda_kernel_with_a_wrong_output_is_replaced_by_pytorch():
    from tests.test_ops_emulated import _emulated_autograd

    build.load_emulated_kernel()
    with pytest.warns(RuntimeWarning, match=r"the cuda backend disagrees .*python -m ops\.check"):
        assert self_check.confirmed("cuda", CPU, lambda *args: _off_by_one_percent(_emulated_autograd, *args)) == (
            "pytorch"
        )
    assert _remembered("cuda") is False


@pytest.mark.skipif(not functional.triton_backend.is_available(), reason="triton cannot run here")
def test_interpreted_triton_kernels_pass_once_per_process(monkeypatch):
    problem = make_problem([(4, 5), (2, 3)], 1, 3, 2, 4, 2, dtype=torch.float32, seed=1)
    calls = []
    original = comparison.compare_with_reference
    monkeypatch.setattr(comparison, "compare_with_reference", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = ms_deform_attn(*op_args(problem), backend="triton")
    second = ms_deform_attn(*op_args(problem), backend="triton")
    assert len(calls) == 1 and _remembered("triton") is True
    torch.testing.assert_close(second, first)


@pytest.mark.skipif(not functional.triton_backend.is_available(), reason="triton cannot run here")
@pytest.mark.parametrize("wrong", [_off_by_one_percent, _crashing], ids=["wrong_output", "crash"])
def test_a_wrong_triton_backend_is_caught_warned_once_and_replaced_by_pytorch(monkeypatch, wrong):
    run_kernel = functional._run_kernel
    monkeypatch.setattr(functional, "_run_kernel", lambda kernel, *args: wrong(run_kernel, kernel, *args))
    problem = make_problem([(4, 5), (2, 3)], 1, 3, 2, 4, 2, dtype=torch.float32, seed=2)
    expected = ms_deform_attn(*op_args(problem), backend="pytorch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [ms_deform_attn(*op_args(problem), backend="triton") for _ in range(3)]
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, RuntimeWarning)]
    assert len(messages) == 1 and "triton backend disagrees" in messages[0]
    assert "python -m ops.check" in messages[0] and self_check.ENV_VAR in messages[0]
    for output in outputs:
        torch.testing.assert_close(output, expected)
    assert _remembered("triton") is False


def test_a_remembered_failure_is_warned_about_and_not_checked_again(monkeypatch):
    key = backend_cache.self_check_key(CPU, "triton", self_check.kernel_digest("triton"))
    backend_cache.remember_self_check(key, passed=False, details={"failure": "output off"})
    monkeypatch.setattr(comparison, "compare_with_reference", _crashing)  # must not run
    with pytest.warns(RuntimeWarning, match="remembered in"):
        assert self_check.confirmed("triton", CPU, _crashing) == "pytorch"


def test_a_verdict_is_for_one_kernel_source(monkeypatch):
    backend_cache.remember_self_check(
        backend_cache.self_check_key(CPU, "triton", "an-older-one"), passed=False, details={}
    )
    assert _remembered("triton") is None


def test_the_environment_variable_turns_the_check_off(monkeypatch):
    monkeypatch.setenv(self_check.ENV_VAR, "0")
    assert self_check.confirmed("cuda", CPU, _crashing) == "cuda"
    assert not self_check._verdicts and _remembered("cuda") is None


def test_ops_check_bypasses_the_self_check_and_records_its_own_verdict():
    with self_check.suspended():
        assert self_check.confirmed("cuda", CPU, _crashing) == "cuda"
    check._remember_verdicts(CPU, ["cuda", "triton"], wrong={"triton"}, dtypes=[torch.float32])
    assert _remembered("cuda") is True and _remembered("triton") is False
    entries = json.loads(backend_cache.cache_file().read_text())["self_checks"]
    assert {entry["by"] for entry in entries.values()} == {"python -m ops.check"}


def test_the_check_runs_under_no_grad_and_leaves_the_global_random_state_alone():
    from tests.test_ops_emulated import _emulated_autograd

    build.load_emulated_kernel()
    state = torch.get_rng_state()
    with torch.no_grad():
        assert self_check.confirmed("cuda", CPU, _emulated_autograd) == "cuda"
    assert torch.equal(torch.get_rng_state(), state)
