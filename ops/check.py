"""Check and time every ``ms_deform_attn`` backend usable on this device, and remember the fastest for "auto".

    python -m ops.check                      # the GPU if there is one, else the CPU
    python -m ops.check --device cpu --dtypes float32 float64 --cases encoder --repeats 3

On a machine with a GPU, run this first, and paste its output into bug reports. For each backend usable here
(those that run on the device and build) it compares the forward and the three gradients with an independent
float64 reference (:mod:`ops.reference`) on small random problems, then times the correct ones on the
:mod:`ops.cases` problems (those of ``python -m benchmarks.msda``) and prints time / floor (the forward's bytes at
the measured copy bandwidth).
The fastest correct backend per dtype (lowest summed forward+backward time) is remembered per (device name, torch
version, dtype) in ``$XDG_CACHE_HOME/deformable_detr/msda_backends.json`` (``~/.cache`` by default), and
``backend="auto"`` uses it from then on; ``DETR_MSDA_BACKEND=<backend>`` overrides it. Its verdict on the cuda
and triton kernels is remembered there too, in place of their first-use self-check (:mod:`ops.self_check`).

Exit status 1 when a compiled backend gives wrong results or crashes, or no backend passes for a dtype. The pytorch
backend's failures are reported but do not count: in float16/bfloat16 ``grid_sample`` computes the location
gradient in that precision (errors of the order of the gradient itself), a known limit of that formulation.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import sys

import torch

from ops import backend_cache, functional, self_check
from ops import cases as problems
from ops.comparison import QUANTITIES, CheckProblem, compare_with_reference
from util.errors import UserError

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# a smoke-test size for the timing part (``--cases tiny``)
TINY = problems.Case("tiny", 1, ((4, 6), (2, 3)), None)
TIMING_CASES = {**problems.CASES, "tiny": TINY}


# odd sizes, a 1x1 level, the model's M=8 and D=32, one level with P=1
CHECK_PROBLEMS = (
    CheckProblem(((5, 7), (3, 4), (1, 1)), batch=2, queries=9, heads=3, channels=5, points=4),
    CheckProblem(((8, 8), (4, 4)), batch=1, queries=17, heads=8, channels=32, points=4),
    CheckProblem(((6, 10),), batch=2, queries=5, heads=2, channels=64, points=1),
)


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The worst error of ``backend`` over :data:`CHECK_PROBLEMS`, per quantity, in units of the tolerance."""
    worst = dict.fromkeys(QUANTITIES, 0.0)
    with self_check.suspended():  # this is the thorough check: the backend itself must run, not a stand-in
        for seed, problem in enumerate(CHECK_PROBLEMS):
            function = functools.partial(functional.ms_deform_attn, backend=backend)
            for quantity, error in compare_with_reference(function, problem, device, dtype, seed).items():
                worst[quantity] = max(worst[quantity], error)
    return worst


def _verdict(errors: dict[str, float]) -> str:
    failing = [f"{quantity} {error:.3g}" for quantity, error in errors.items() if not error <= 1]
    if failing:
        return "WRONG (" + ", ".join(failing) + ")"
    return f"ok ({max(errors.values()):.3g})"


def usable_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(backends that run on ``device`` and load here, {backend that runs on it but fails to load: why})."""
    usable, failed = [], {}
    for backend in functional.BACKENDS:
        if backend in ("auto", "deformconv"):  # deformconv: an export formulation, 5x slower than pytorch here
            continue
        try:
            functional.resolve_backend(backend, device)
        except ValueError:  # a backend of another device
            continue
        except RuntimeError as error:  # KernelBuildError, or a backend that needs what is missing here
            failed[backend] = str(error).splitlines()[0]
            continue
        usable.append(backend)
    return usable, failed


def describe_environment(device: torch.device) -> list[str]:
    lines = [
        f"device: {device} ({backend_cache.device_name(device)})",
        f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{platform.system()} {platform.machine()}",
    ]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        lines.append(f"compute capability {major}.{minor}")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    named = backend_cache.env_backend(functional.BACKENDS)
    if named is not None:
        lines.append(f"{backend_cache.ENV_VAR}={named} is set: it overrides the remembered choice for auto")
    return lines


def time_backends(
    backends: list[str], device: torch.device, dtype: torch.dtype, cases: list[str], repeats: int, bandwidth: float
) -> dict[str, dict[str, tuple[float, float]]]:
    """Print a table row per case and backend; returns {backend: {case: (forward ms, forward+backward ms)}}."""
    print("\n| case | dtype | backend | forward ms | fwd+bwd ms | floor ms | fwd / floor |")
    print("|---|---|---|---:|---:|---:|---:|")
    timings = {backend: {} for backend in backends}
    for case_name in cases:
        inputs = problems.make_inputs(TIMING_CASES[case_name], device, dtype)
        floor_ms = problems.floor_bytes(inputs) / bandwidth * 1e3
        for backend in backends:
            with self_check.suspended():
                forward_ms, both_ms = problems.time_backend(backend, inputs, repeats, warmup=1)
            timings[backend][case_name] = (forward_ms, both_ms)
            print(
                f"| {case_name} | {_dtype_name(dtype)} | {backend} | {forward_ms:.3f} | {both_ms:.3f} | "
                f"{floor_ms:.4f} | {forward_ms / floor_ms:.1f}x |",
                flush=True,
            )
    return timings


def correct_backends(backends: list[str], device: torch.device, dtype: torch.dtype) -> tuple[list[str], bool]:
    """Print each backend's verdict; returns (the correct ones, whether a compiled backend failed)."""
    print(f"\n## {_dtype_name(dtype)}: correctness against the float64 reference (error / tolerance, <= 1 passes)")
    correct, kernel_failed = [], False
    for backend in backends:
        try:
            verdict = _verdict(check_backend(backend, device, dtype))
        except Exception as failure:  # a backend that crashes on this dtype is reported, not fatal
            verdict = f"ERROR {type(failure).__name__}: {failure}"
        print(f"{backend}: {verdict}")
        if verdict.startswith("ok"):
            correct.append(backend)
        elif backend != "pytorch":
            kernel_failed = True
    return correct, kernel_failed


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run(
    device: torch.device, dtypes: list[torch.dtype], cases: list[str], repeats: int, bandwidth_mib: int, save: bool
) -> int:
    """Check, time and remember; prints everything (paste it into a bug report). Returns the exit status."""
    for line in describe_environment(device):
        print(line)
    usable, failed = usable_backends(device)
    print(f"backends usable on {device.type}: {', '.join(usable)}")
    for backend, reason in failed.items():
        print(f"backend {backend}: NOT USABLE: {reason}")
    bandwidth = problems.copy_bandwidth(device, bandwidth_mib * 2**20)
    print(f"measured copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s; floor = forward bytes / bandwidth")
    status = 0
    wrong_somewhere: set[str] = set()
    for dtype in dtypes:
        correct, kernel_failed = correct_backends(usable, device, dtype)
        wrong_somewhere.update(backend for backend in usable if backend not in correct)
        if kernel_failed or not correct:
            status = 1
        if not correct:
            continue
        timings = time_backends(correct, device, dtype, cases, repeats, bandwidth)
        fastest = min(correct, key=lambda backend: sum(both for _, both in timings[backend].values()))
        print(f"fastest for {_dtype_name(dtype)} (summed forward+backward over {', '.join(cases)}): {fastest}")
        if save:
            details = {
                "forward_ms": {case: round(forward, 4) for case, (forward, _) in timings[fastest].items()},
                "forward_backward_ms": {case: round(both, 4) for case, (_, both) in timings[fastest].items()},
                "checked": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            path = backend_cache.remember(device, dtype, fastest, details)
            print(f'backend="auto" now uses {fastest} for "{backend_cache.cache_key(device, dtype)}" (saved in {path})')
    if save:
        _remember_verdicts(device, [b for b in usable if b in self_check.CHECKED_BACKENDS], wrong_somewhere, dtypes)
    return status


def _remember_verdicts(device: torch.device, backends: list[str], wrong: set[str], dtypes: list[torch.dtype]) -> None:
    """Record this check's verdict on the GPU kernels, so that their first-use self-check needs not run again."""
    checked = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for backend in backends:
        key = backend_cache.self_check_key(device, backend, self_check.kernel_digest(backend))
        details = {"checked": checked, "by": "python -m ops.check", "dtypes": [_dtype_name(d) for d in dtypes]}
        backend_cache.remember_self_check(key, passed=backend not in wrong, details=details)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--cases", nargs="+", choices=sorted(TIMING_CASES), default=list(problems.CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bandwidth-mib", type=int, default=256, help="buffer size of the copy-bandwidth probe")
    parser.add_argument("--no-save", action="store_true", help="do not remember the fastest backend")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to torch here")
    default_dtypes = ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]
    dtypes = [DTYPES[name] for name in (args.dtypes or default_dtypes)]
    try:
        return run(device, dtypes, args.cases, args.repeats, args.bandwidth_mib, save=not args.no_save)
    except UserError as error:  # e.g. a DETR_MSDA_BACKEND that names no backend
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
