"""Build and load the compiled kernels of multi-scale deformable attention.

Kernels compile from ``ops/csrc`` on first use with ``torch.utils.cpp_extension`` and ninja, into torch's
extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); later loads reuse the
build unless a source changed. Build ahead of time, or check that the CUDA source compiles on a machine
without a GPU::

    python -m ops.build            # the CPU kernel, and the CUDA kernel where a GPU is visible
    python -m ops.build --cuda     # also compile the CUDA kernel without a GPU (TORCH_CUDA_ARCH_LIST or 8.0;9.0)
    python -m ops.build --cuda --emulated   # what make test builds: also the CUDA kernels for the host emulation

The kernels compile side by side, as many at once as the CPU has cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ops import custom_ops  # noqa: F401  (defines the op schemas the kernels register against)

CSRC = Path(__file__).resolve().parent / "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0"


class KernelBuildError(RuntimeError):
    """A compiled kernel could not be built or loaded; the message holds the compiler's complaint."""


def _cpu_vector_flags() -> list[str]:
    """The vector instructions to compile the CPU kernel for: those this CPU has, as torch reports them at run
    time. AVX-512 (with its native bfloat16 instructions where present) selects the AVX-512 loops of
    ``ms_deform_attn_cpu_avx512.h``; AVX2 and FMA (on an AVX-512 CPU too) those of ``ms_deform_attn_cpu_avx2.h`` and
    double the x86-64 baseline's width for the portable loops."""
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "DEFAULT")()
    if capability == "AVX512":
        flags = ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            flags.append("-mavx512bf16")
        return flags
    return ["-mavx2", "-mfma"] if capability == "AVX2" else []


def _extension_name(kind: str, flags: list[str]) -> str:
    # The torch version and the vector flags are part of the name: a build against another torch's headers, or
    # for a CPU with other instructions (a cache shared by a cluster's nodes), must not be reused.
    widest = [flag.removeprefix("-m") for flag in flags if flag in ("-mavx2", "-mavx512f", "-mavx512bf16")]
    suffix = f"_{widest[-1]}" if widest else ""
    return f"deformable_detr_msda_{kind}{suffix}_" + re.sub(r"[^0-9a-zA-Z]", "_", torch.__version__)


def _set_compiler_environment(cuda: bool) -> None:
    """CUDA_HOME where torch might guess it wrong, and with ``cuda`` and no GPU the architectures to compile for.
    Called before the builds start (``main``), so that builds running side by side never write the environment."""
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda").is_dir():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # else torch may guess the parent of a nvcc on PATH
    if cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS


def _build(kind: str, sources: list[Path], verbose: bool, defines: tuple[str, ...] = ()) -> None:
    _set_compiler_environment(kind == "cuda")
    if not verbose:  # torch logs "No CUDA runtime is found" on import on machines without a GPU
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    vector_flags = _cpu_vector_flags() if kind != "cuda" else []
    try:
        load(
            name=_extension_name(kind, vector_flags),
            sources=[str(source) for source in sources],
            extra_include_paths=[str(CSRC)],
            extra_cflags=[
                "-O3",
                "-fopenmp",
                # lets the CPU kernel's selections vectorise (ms_deform_attn_cpu_sampling.h); not for CUDA, whose
                # extension name does not carry its flags (checkouts sharing a cache would rebuild it in turn)
                *(["-fno-trapping-math"] if kind != "cuda" else []),
                *vector_flags,
                *(f"-D{define}" for define in defines),
            ],
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            with_cuda=kind == "cuda",
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as error:  # compiler missing, compile error, loader error: all mean "no kernel"
        raise KernelBuildError(f"building the {kind} kernel of ms_deform_attn failed: {error}") from error


# kind -> None once loaded, or the error of its failed build: each kernel is built at most once per process, so
# that backend="auto" does not run the compiler again on every call after a failure.
_outcomes: dict[str, KernelBuildError | None] = {}


def _build_once(kind: str, sources: list[Path], verbose: bool, defines: tuple[str, ...] = ()) -> None:
    if kind not in _outcomes:
        try:
            _build(kind, sources, verbose, defines)
            _outcomes[kind] = None
        except KernelBuildError as error:
            _outcomes[kind] = error
    failure = _outcomes[kind]
    if failure is not None:
        raise KernelBuildError(f"{failure} (not retried in this process)") from failure.__cause__


def load_cpu_kernel(verbose: bool = False) -> None:
    """Compile (first time) and load the C++ CPU kernel; raises :class:`KernelBuildError`, also on every call
    after a failed build (which is attempted once per process)."""
    _build_once("cpu", [CSRC / "ms_deform_attn_cpu.cpp"], verbose)


def load_cuda_kernel(verbose: bool = False) -> None:
    """Compile (first time) and load the CUDA kernel; raises :class:`KernelBuildError` (the build is attempted
    once per process, as for the CPU kernel).

    Without a visible GPU it still compiles (for ``TORCH_CUDA_ARCH_LIST``, default 8.0;9.0), which lets CI
    catch a CUDA compile error on a machine with nvcc but no GPU.
    """
    if torch.version.cuda is None:
        raise KernelBuildError(f"this torch ({torch.__version__}) is not a CUDA build")
    _build_once("cuda", [CSRC / "ms_deform_attn_cuda.cu"], verbose)


EMULATED_LIBRARY = "deformable_detr_emulated"
MUTANT_LIBRARY = "deformable_detr_emulated_mutants"


def load_emulated_kernel(verbose: bool = False, mutants: bool = False) -> None:
    """Compile (first time) and load the CUDA kernels built for the CPU by the host compiler (tests and tools only).

    Registers the ops of ``torch.ops.deformable_detr_emulated`` (``ms_deform_attn_forward`` /
    ``ms_deform_attn_backward``: the exact kernel code of ``ms_deform_attn_cuda_kernels.h`` run by the emulation in
    ``cuda_emulation.h``; ``counters``, ``set_seed``, ``set_architecture``, ...). ``mutants=True`` builds the same
    source with ``MSDA_MUTATIONS`` as ``torch.ops.deformable_detr_emulated_mutants``, whose ``set_mutation(name)``
    switches on one of the deliberate defects the tests show the emulation catches. Raises
    :class:`KernelBuildError`.
    """
    if mutants:
        defines = ("MSDA_MUTATIONS", f"MSDA_EMULATED_LIBRARY={MUTANT_LIBRARY}")
        _build_once("emulated_mutants", [CSRC / "ms_deform_attn_emulated.cpp"], verbose, defines)
    else:
        _build_once("emulated", [CSRC / "ms_deform_attn_emulated.cpp"], verbose)


def planned_builds(cuda: bool, cpu: bool, emulated: bool) -> list[tuple[str, Callable[[bool], None]]]:
    """The builds ``python -m ops.build`` runs, as (name, loader taking ``verbose``), the longest first: the CUDA
    kernel (with ``cuda``, or wherever a GPU is visible), the CPU kernel (``cpu``), the two emulation libraries
    (``emulated``)."""
    builds: list[tuple[str, Callable[[bool], None]]] = []
    if cuda or torch.cuda.is_available():
        builds.append(("cuda", load_cuda_kernel))
    if cpu:
        builds.append(("cpu", load_cpu_kernel))
    if emulated:
        builds.append(("emulated", load_emulated_kernel))
        builds.append(("emulated mutants", functools.partial(load_emulated_kernel, mutants=True)))
    return builds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cuda", action="store_true", help="compile the CUDA kernel even without a GPU")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU kernel")
    parser.add_argument(
        "--emulated", action="store_true", help="also compile the CUDA kernels for the host emulation (for the tests)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    builds = planned_builds(args.cuda, not args.no_cpu, args.emulated)
    _set_compiler_environment(cuda=any(name == "cuda" for name, _ in builds))
    # Each build is one compiler process that this one only waits for: as many at once as the CPU has cores.
    workers = max(1, min(len(builds), os.cpu_count() or 1))
    failed = False
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        started = [(name, pool.submit(loader, args.verbose)) for name, loader in builds]
        for name, future in started:
            try:
                future.result()
                print(f"{name} kernel: built and loaded")
            except KernelBuildError as error:
                print(f"{name} kernel: FAILED\n{error}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
