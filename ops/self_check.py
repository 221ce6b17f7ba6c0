"""The first-use self-check of the GPU kernels: a kernel that has never run on this device proves itself first.

The first time a process runs the ``cuda`` or ``triton`` backend on a device, :func:`confirmed` compares a small
random problem (the forward and the three gradients, float32) with the float64 reference of :mod:`ops.reference`,
in milliseconds on a GPU. The verdict is remembered per device model, torch version, backend and kernel source in
the file where ``python -m ops.check`` keeps its results (:mod:`ops.backend_cache`), so later processes do not
check again until the kernel changes. A backend that disagrees is reported once per process with a warning that
names it and ``python -m ops.check``, and ``ms_deform_attn`` runs the ``pytorch`` backend in its place from then
on. ``DETR_MSDA_SELF_CHECK=0`` turns the check off.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ops import backend_cache, comparison

ENV_VAR = "DETR_MSDA_SELF_CHECK"
CHECKED_BACKENDS = ("cuda", "triton")
_OPS = Path(__file__).resolve().parent
# the files whose text is the kernel: a verdict holds until one of them changes
KERNEL_SOURCES = {
    "cuda": ("csrc/ms_deform_attn_cuda.cu", "csrc/ms_deform_attn_cuda_kernels.h", "csrc/bilinear.h", "csrc/checks.h"),
    "triton": ("triton_kernels.py", "triton_backend.py"),
}

# the model's D=32 (the vector path), odd map sizes: a few milliseconds on a GPU
SELF_CHECK_PROBLEM = comparison.CheckProblem(((6, 7), (3, 4)), batch=2, queries=5, heads=2, channels=32, points=3)

# (backend, device) -> passed, for this process
_verdicts: dict[tuple[str, str], bool] = {}
_suspended = 0


def enabled() -> bool:
    """False when ``DETR_MSDA_SELF_CHECK`` is ``0`` (or ``false``, ``no``, ``off``)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No self-check inside: ``python -m ops.check`` checks the backends itself, and the check must not recurse."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


@functools.cache
def kernel_digest(backend: str) -> str:
    """12 hex digits of the kernel's source files (and the triton version for ``triton``)."""
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES[backend]:
        digest.update((_OPS / name).read_bytes())
    if backend == "triton":
        import triton

        digest.update(triton.__version__.encode())
    return digest.hexdigest()[:12]


def confirmed(backend: str, device: torch.device, kernel: Callable[..., torch.Tensor]) -> str:
    """``backend`` if it passed (or passes now) the self-check on ``device``, else ``"pytorch"``.

    ``kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)`` runs the backend
    without going through this check, differentiably.
    """
    if backend not in CHECKED_BACKENDS or _suspended or not enabled() or _capturing(device):
        return backend
    memo = (backend, str(device))
    if memo not in _verdicts:
        _verdicts[memo] = _verdict(backend, device, kernel)
    return backend if _verdicts[memo] else "pytorch"


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _verdict(backend: str, device: torch.device, kernel: Callable[..., torch.Tensor]) -> bool:
    key = backend_cache.self_check_key(device, backend, kernel_digest(backend))
    remembered = backend_cache.remembered_self_check(key)
    if remembered is not None:
        if not remembered:
            _warn(backend, device, f"remembered in {backend_cache.cache_file()}")
        return remembered
    failure = _compare(kernel, device)
    details = {
        "checked": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "by": "first use",
    }
    if failure:
        details["failure"] = failure
    with contextlib.suppress(OSError):  # an unwritable cache: the verdict still holds for this process
        backend_cache.remember_self_check(key, passed=not failure, details=details)
    if failure:
        _warn(backend, device, failure)
    return not failure


def _compare(kernel: Callable[..., torch.Tensor], device: torch.device) -> str:
    """ "" if the kernel matches the reference on the self-check problem, else what disagreed (or what it raised)."""
    dtype = torch.float32
    try:
        with _differentiable():
            errors = comparison.compare_with_reference(kernel, SELF_CHECK_PROBLEM, device, dtype, seed=0)
    except Exception as error:  # a kernel that crashes here is as wrong as one that miscomputes
        return f"it raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    failing = [f"{quantity} off by {error:.3g}x the tolerance" for quantity, error in errors.items() if not error <= 1]
    return ", ".join(failing)


@contextlib.contextmanager
def _differentiable() -> Iterator[None]:
    """Gradients on, autocast off and nondeterminism allowed, whatever the caller's context."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if deterministic:  # the value gradient's atomics would raise; this check does not need determinism
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            if deterministic:
                torch.use_deterministic_algorithms(True, warn_only=warn_only)


def _warn(backend: str, device: torch.device, reason: str) -> None:
    warnings.warn(
        f"ms_deform_attn: the {backend} backend disagrees with the float64 reference on {device} "
        f"({backend_cache.device_name(device)}): {reason}. This process uses the pytorch backend instead; run "
        f"python -m ops.check for the full report (and paste it into a bug report). {ENV_VAR}=0 turns this "
        "check off.",
        RuntimeWarning,
        stacklevel=4,
    )
