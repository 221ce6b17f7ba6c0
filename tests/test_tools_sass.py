"""tools.sass: loops found from the branches of a SASS listing, loads by width, and a real compile where nvcc is."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tools import sass

LISTING = """
.text._Z6kernelPf:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, [R4.64] ;
.L_x_1:
	//## File "k.cu", line 10
        /*0020*/                   LDG.E.128 R8, [R6.64] ;
	//## File "helper.h", line 3 inlined at "k.cu", line 11
        /*0030*/                   LDG.E.128 R12, [R6.64+0x10] ;
        /*0040*/                   FFMA R3, R8, R2, R3 ;
	//## File "k.cu", line 10
        /*0050*/                   LDG.E.128 R16, [R6.64+0x20] ;
	//## File "helper.h", line 3 inlined at "k.cu", line 11
        /*0060*/                   LDG.E.128 R20, [R6.64+0x30] ;
        /*0070*/               @P0 BRA `(.L_x_1) ;
        /*0080*/                   LDG.E.U16 R5, [R4.64+0x2] ;
        /*0090*/              @!P1 BRA `(.L_x_0) ;
.L_x_2:
        /*00a0*/                   BRA `(.L_x_2);
.text._Z5otherv:
        /*0000*/                   EXIT ;
"""


def _loops():
    functions, labels = sass.parse_functions(LISTING), sass.label_addresses(LISTING)
    return sass.find_loops(functions["_Z6kernelPf"], labels["_Z6kernelPf"])


def test_backward_branches_are_loops_and_the_trap_at_the_end_is_not():
    assert [(loop.start, loop.end) for loop in _loops()] == [(0x10, 0x90), (0x20, 0x70)]


def test_sampling_loop_is_the_innermost_loop_with_loads():
    loop = sass.sampling_loop(_loops())
    assert (loop.start, len(loop.instructions)) == (0x20, 6)
    assert [sass.load_width(ins.opcode) for ins in loop.loads] == [128, 128, 128, 128]


def test_evidence_counts_loads_per_calling_line_of_the_kernel():
    assert sass.sampling_loop(_loops()).evidence() == "10:2 11:2"  # helper.h inlined at line 11 counts for 11


REDUCTION = """
.text._Z1rv:
.L_x_0:
        /*0000*/                   LDG.E.128 R8, [R6.64] ;
        /*0010*/                   FFMA R3, R8, R2, R3 ;
.L_x_1:
        /*0020*/                   SHFL.BFLY PT, R4, R3, 0x1, 0x1f ;
        /*0030*/                   FADD R3, R3, R4 ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
"""


def test_a_shuffle_reduction_nested_in_the_sampling_loop_counts_as_part_of_it():
    functions, labels = sass.parse_functions(REDUCTION), sass.label_addresses(REDUCTION)
    loop = sass.sampling_loop(sass.find_loops(functions["_Z1rv"], labels["_Z1rv"]))
    assert (loop.start, len(loop.instructions)) == (0x0, 6)
    assert loop.evidence() == "?:1, 1 SHFL"


@pytest.mark.parametrize(
    ("opcode", "bits"), [("LDG.E", 32), ("LDG.E.64.CONSTANT", 64), ("LDG.E.128", 128), ("LDG.E.U16.CONSTANT", 16)]
)
def test_load_width(opcode, bits):
    assert sass.load_width(opcode) == bits


def test_short_names_and_dtypes():
    name = sass.short_name("void deformable_detr::(anonymous namespace)::forward_kernel<float>(float const*, int)")
    assert name == "forward_kernel<float>"
    assert sass.template_dtype("col2im_kernel<float, 32u>") == "float"


def test_floor_table_has_the_coco_encoder_at_batch_two():
    rows = [row for row in sass.floor_table() if row.startswith("| coco_encoder N=2 |")]
    # value 2*22223*8*32, samples 2*22223*8*16 (x3: x, y, weight), output 2*22223*8*32 elements of 4 bytes
    elements = 2 * 22223 * 8 * 32 * 2 + 2 * 22223 * 8 * 16 * 3
    assert rows[0].split("|")[6].strip() == f"{elements * 4 / 1e6:.1f}"


def _has(tool: str) -> bool:
    try:
        sass.find_tool(tool)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not all(_has(tool) for tool in ("nvcc", "cuobjdump", "nvdisasm")), reason="no CUDA toolkit")
def test_a_compiled_vector_loop_is_measured(tmp_path):
    source = tmp_path / "vector.cu"
    source.write_text(
        "__global__ void sum4(const float4* __restrict__ x, float* out, int n) {\n"
        "  float total = 0.f;\n"
        "  for (int i = threadIdx.x; i < n; i += blockDim.x) {\n"
        "    const float4 v = x[i];\n"
        "    total += v.x + v.y + v.z + v.w;\n"
        "  }\n"
        "  out[threadIdx.x] = total;\n"
        "}\n"
    )
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    (stats,) = sass.measure("vector", source, "80", (), {"sum4": 4}, {}, tmp_path)
    assert stats.kernel == "sum4" and stats.registers > 0 and stats.spill_bytes == (0, 0)
    assert stats.loop_loads[128] >= 1 and stats.kernel_loads[128] >= 1
    assert stats.channels == 4 and stats.unroll == 1
    assert stats.per_sample_channel == stats.loop_instructions / 4


def test_find_tool_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", str(Path("/nonexistent")))
    with pytest.raises(FileNotFoundError, match="no_such_tool not found"):
        sass.find_tool("no_such_tool")


def test_registers_and_spills_are_read_per_function():
    usage = " Function _Z1kv:\n  REG:40 STACK:0 SHARED:0 LOCAL:0\n Function _Z1gv:\n  REG:255 STACK:8 LOCAL:24\n"
    report = (
        "ptxas info    : Function properties for _Z1kv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Function properties for _Z1gv\n"
        "    8 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
    )
    assert sass.parse_registers(usage) == {"_Z1kv": 40, "_Z1gv": 255}
    assert sass.parse_spills(report) == {"_Z1kv": (0, 0), "_Z1gv": (24, 16)}


def test_a_vector_atomic_keeps_its_width_in_the_opcode():
    listing = ".text._Z1av:\n        /*0000*/    REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R4 ;\n"
    (instruction,) = sass.parse_functions(listing)["_Z1av"]
    assert instruction.opcode == "REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU" and instruction.operands.startswith("desc")
