"""Compile the Triton kernels for a CUDA GPU architecture on a machine without a GPU (nothing is launched).

    python -m tools.triton_compile 80      # sm_80; TRITON_INTERPRET must be unset

Prints one line per kernel and dtype with the PTX instructions that matter here (global loads, stores, atomic
adds: ``atom.global``, or ``red.global`` where the result is unused, as Triton 3.9 emits them) and ptxas's register
and spill counts, for the tile ops.triton_backend launches with D=32 channels; exits
non-zero with the compiler's error if a kernel does not compile for the GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from ops import triton_backend, triton_kernels

DTYPES = {"float32": ("fp32", "float32"), "bfloat16": ("bf16", "float32"), "float64": ("fp64", "float64")}
INTEGER_POINTERS = ("shapes_ptr", "starts_ptr")


def compile_kernel(kernel, dtype: str, arch: int, channels: int = 32, queries: int = 300, warps: int | None = None):
    """The compiled kernel (``.asm`` holds its PTX) for value in ``dtype`` on sm_``arch``, with the warps the
    backend launches (``warps`` overrides them) and the 16-byte pointer alignment a launch specialises."""
    data, accumulate = DTYPES[dtype]
    signature = {}
    for name in kernel.arg_names:
        if name in INTEGER_POINTERS:
            signature[name] = "*i64"
        elif name == "grad_value_ptr":
            signature[name] = f"*fp{accumulate[-2:]}"
        elif name.endswith("_ptr"):
            signature[name] = f"*{data}"
        else:
            signature[name] = "constexpr" if name.isupper() else "i32"
    block_queries, block_channels = triton_backend.block_sizes(queries, channels)
    constants = {
        "CHANNELS": channels,
        "ACC": getattr(triton.language, accumulate),
        "BLOCK_Q": block_queries,
        "BLOCK_D": block_channels,
    }
    # as a launch specialises them: every tensor torch allocates starts on a 16-byte boundary
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name.endswith("_ptr")}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    element_size = {"float32": 4, "bfloat16": 2, "float64": 8}[dtype]
    if warps is None:  # as ops.triton_backend launches it
        warps = triton_backend.warps_for(block_queries, block_channels, element_size)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def ptxas_usage(ptx: str, arch: int) -> str:
    """ptxas -v's "Used N registers" and spill figures for the PTX (the first of triton's ptxas binaries that
    reads its PTX version: triton 3.9 writes PTX 9.4 for sm_90a, which only its ptxas-blackwell reads)."""
    default = Path(triton.knobs.nvidia.ptxas.path)
    target = re.search(r"^\.target (\w+)", ptx, re.M)  # sm_90a where triton targets it
    gpu = target.group(1) if target else f"sm_{arch}"
    report = ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        for ptxas in (default, default.with_name("ptxas-blackwell")):
            command = [str(ptxas), "-v", f"--gpu-name={gpu}", file.name, "-o", "/dev/null"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                report = result.stderr
                break
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return f"{registers.group(1) if registers else '?'} registers, {spills.group(1) if spills else '?'} bytes spilled"


def main(arch: int) -> None:
    if triton_kernels.INTERPRETED:
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for kernel in (triton_kernels.ms_deform_attn_forward_kernel, triton_kernels.ms_deform_attn_backward_kernel):
        for dtype in DTYPES:
            ptx = compile_kernel(kernel, dtype, arch).asm["ptx"]
            counts = Counter(re.findall(r"(?:ld|st|atom|red)\.global[.\w]*", ptx))
            print(
                kernel.__name__, dtype, f"sm_{arch}", ptxas_usage(ptx, arch), dict(sorted(counts.items())), flush=True
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
