"""Compile the Triton kernels for a CUDA GPU architecture on a machine without a GPU (nothing is launched).

    python tests/triton_compile.py 80      # sm_80; TRITON_INTERPRET must be unset

Prints one line per compiled kernel and dtype with the PTX instructions that matter here (global loads, stores,
atomic adds); exits non-zero with the compiler's error if a kernel does not compile for the GPU.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget

from ops import triton_kernels

DTYPES = {"float32": ("fp32", "fp32"), "bfloat16": ("bf16", "fp32"), "float64": ("fp64", "fp64")}  # (data, ACC)
INTEGER_POINTERS = ("shapes_ptr", "starts_ptr")


def compile_kernel(kernel, dtype: str, arch: int, channels: int = 32, block_queries: int = 64):
    data, accumulate = DTYPES[dtype]
    signature = {}
    for name in kernel.arg_names:
        if name in INTEGER_POINTERS:
            signature[name] = "*i64"
        elif name == "grad_value_ptr":
            signature[name] = f"*{accumulate}"
        elif name.endswith("_ptr"):
            signature[name] = f"*{data}"
        elif name.isupper():
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    constants = {
        "CHANNELS": channels,
        "ACC": getattr(triton.language, {"fp32": "float32", "fp64": "float64"}[accumulate]),
        "BLOCK_Q": block_queries,
        "BLOCK_D": triton.next_power_of_2(channels),
    }
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32))


def main(arch: int) -> None:
    if triton_kernels.INTERPRETED:
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for kernel in (triton_kernels.ms_deform_attn_forward_kernel, triton_kernels.ms_deform_attn_backward_kernel):
        for dtype in DTYPES:
            ptx = compile_kernel(kernel, dtype, arch).asm["ptx"]
            counts = Counter(re.findall(r"(?:ld|st|atom)\.global[.\w]*", ptx))
            print(kernel.__name__, dtype, f"sm_{arch}", dict(sorted(counts.items())), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
