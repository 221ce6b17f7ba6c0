"""tools.gpu_model: a warp's path through hand-made SASS listings (loop trips, unrolled loops and their remainder,
the path rules), what the executed instructions move, and the time range. No GPU, no timing."""

from __future__ import annotations

import math

import pytest

from tools import gpu_model, sass

SOURCE = """__global__ void k() {
  if (idle) return;
  for (int first = 0; first < samples; first += lanes) {
    geometry();
    for (int k = 0; k < count; ++k) {
      shuffle();
      load(value + offset);
    }
  }
}
"""

# the k loop unrolled twice (two shuffles per trip), its remainder after it, inside the loop over `first`
NESTED = """
.text._Z1kv:
        //## File "{path}", line 1
        /*0000*/                   S2R R0, SR_TID.X ;
        //## File "{path}", line 2
        /*0010*/               @P0 EXIT ;
.L_x_0:
        //## File "{path}", line 4
        /*0020*/                   LDG.E R2, [R4.64] ;
        //## File "{path}", line 5
        /*0030*/              @!P1 BRA `(.L_x_3) ;
.L_x_1:
        //## File "{path}", line 6
        /*0040*/                   SHFL.IDX PT, R3, R2, R0, R1 ;
        //## File "{path}", line 7
        /*0050*/                   LDG.E.128 R8, [R6.64] ;
        //## File "{path}", line 6
        /*0060*/                   SHFL.IDX PT, R3, R2, R0, R1 ;
        //## File "{path}", line 7
        /*0070*/                   LDG.E.128 R12, [R6.64+0x10] ;
        //## File "{path}", line 5
        /*0080*/               @P2 BRA `(.L_x_1) ;
.L_x_3:
        /*0090*/              @!P3 BRA `(.L_x_4) ;
        //## File "{path}", line 6
        /*00a0*/                   SHFL.IDX PT, R3, R2, R0, R1 ;
        //## File "{path}", line 7
        /*00b0*/                   LDG.E.128 R8, [R6.64] ;
.L_x_4:
        //## File "{path}", line 3
        /*00c0*/               @P4 BRA `(.L_x_0) ;
        //## File "{path}", line 10
        /*00d0*/                   EXIT ;
"""


@pytest.fixture
def nested(tmp_path):
    path = tmp_path / "k.cu"
    path.write_text(SOURCE)
    listing = NESTED.replace("{path}", str(path))
    return sass.parse_functions(listing)["_Z1kv"], sass.label_addresses(listing)["_Z1kv"]


def _walker(instructions, labels, trips, anchors=None, branches=None):
    def lookup(table, text):
        return next((value for pattern, value in (table or {}).items() if pattern in text), None)

    return gpu_model.Walker(
        instructions,
        labels,
        trips=lambda text: lookup(trips, text),
        anchors=lambda text: lookup(anchors, text),
        branches=lambda text: lookup(branches, text),
    )


@pytest.mark.parametrize(
    ("count", "main_trips", "remainder"), [(5, 2, 1), (4, 2, 0), (1, 0, 1)], ids=["odd", "even", "one"]
)
def test_an_unrolled_loop_runs_trips_over_unroll_times_and_its_remainder_only_when_needed(
    nested, count, main_trips, remainder
):
    instructions, labels = nested
    walker = _walker(instructions, labels, {"int first": 2, "int k = 0": count}, anchors={"int k = 0": ("SHFL", 1)})
    counts = walker.execute().counts
    outer = 2
    assert counts[0x0010] == 1 and counts[0x00D0] == 1  # the idle warp's EXIT is not taken; one exit at the end
    assert counts[0x0020] == outer and counts[0x00C0] == outer
    assert counts[0x0040] == outer * main_trips
    assert counts[0x00A0] == outer * remainder
    assert sum(counts[0x40 + 16 * i] for i in range(4)) // 2 * 2 + outer * remainder * 2 == 2 * outer * count


def test_a_loop_without_a_trip_count_is_an_error_naming_its_line(nested):
    instructions, labels = nested
    walker = _walker(instructions, labels, {"int k = 0": 4})
    with pytest.raises(ValueError, match="for \\(int first"):
        walker.execute()


BRANCHES = """
.text._Z1bv:
        //## File "{path}", line 2
        /*0000*/              @!P1 BRA `(.L_x_1) ;
        /*0010*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0020*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0030*/                   IMAD R2, R3, R4, RZ ;
.L_x_2:
        //## File "{path}", line 3
        /*0040*/               @P0 BRA `(.L_x_3) ;
        /*0050*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R3 ;
        /*0060*/                   BRA `(.L_x_4) ;
.L_x_3:
        /*0070*/                   LDG.E.128 R4, [R2.64] ;
        /*0080*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R3 ;
.L_x_4:
        /*0090*/                   EXIT ;
"""


def _branches(tmp_path):
    path = tmp_path / "b.cu"
    path.write_text("void b() {\n  q = a / b;\n  if (want) {\n}\n")
    listing = BRANCHES.replace("{path}", str(path))
    return sass.parse_functions(listing)["_Z1bv"], sass.label_addresses(listing)["_Z1bv"]


def test_a_branch_into_a_runtime_helper_call_is_avoided_and_other_branches_fall_through(tmp_path):
    counts = _walker(*_branches(tmp_path), {}).execute().counts
    assert sorted(counts) == [0x00, 0x30, 0x40, 0x50, 0x60, 0x90]


def test_a_seek_rule_takes_the_side_that_reaches_the_opcode(tmp_path):
    counts = _walker(*_branches(tmp_path), {}, branches={"if (want)": "seek:LDG"}).execute().counts
    assert sorted(counts) == [0x00, 0x30, 0x40, 0x70, 0x80, 0x90]


def test_loop_extent_of_braced_single_statement_and_python_loops():
    lines = SOURCE.splitlines()
    assert gpu_model.loop_extent(lines, 3) == 9 and gpu_model.loop_extent(lines, 5) == 8
    assert gpu_model.loop_extent(["for (int c = 0; c < 4; ++c) x[c] = y(", "  c);", "z();"], 1) == 2
    python = ["    for level in range(levels):", "        a = 1", "", "        b = 2", "    c = 3"]
    assert gpu_model.loop_extent(python, 1) == 4


@pytest.mark.parametrize(
    ("opcode", "width"),
    [("REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU", 16), ("RED.E.ADD.F32.FTZ.RN.STRONG.GPU", 4),
     ("RED.E.ADD.F64.RN.STRONG.GPU", 8), ("LDG.E.128.CONSTANT", 16), ("LDG.E.U16", 2)],
)  # fmt: skip
def test_access_width(opcode, width):
    assert gpu_model.access_width(opcode) == width


@pytest.mark.parametrize(
    ("lanes", "stride", "width", "sectors"),
    [(8, 16, 4, 4), (8, 16, 16, 4), (32, 4, 4, 4), (4, 32, 4, 4), (16, 16, 8, 8), (32, 8, 8, 8)],
)
def test_sectors_per_group(lanes, stride, width, sectors):
    # 8 lanes of 4 floats: scalar atomics touch the same 4 sectors as one vector atomic, in 4 instructions
    assert gpu_model.sectors_per_group(lanes, stride, width) == sectors


def test_count_scales_one_warp_to_the_launch(nested):
    instructions, labels = nested
    launch = gpu_model.Launch(2, 100, 100, 8, 32, 2, 4, element_size=4, accumulate_size=4)
    spec = gpu_model.KernelSpec(
        label="toy",
        direction="forward",
        function="k",
        loops={r"int first": lambda launch: 2, r"int k = 0": lambda launch: 4},
        anchors={r"int k = 0": ("SHFL", 1)},
        branches={},
        gather=r"load\(value",
        atomics=r"$^",
        lanes=lambda launch: 8,
        lane_bytes=lambda launch: 16,
        atomic_lane_bytes=lambda launch: 16,
        warps=lambda launch: 1000,
        sample_channels_per_warp=lambda launch: 4 * 8 * 16,
    )
    counts, path = gpu_model.count(instructions, labels, spec, launch, inside=0.5, floor_bytes=1e6)
    per_warp = sum(path.counts.values())
    assert counts.warp_instructions == 1000 * per_warp
    assert counts.instructions_per_sample_channel == per_warp * 32 / (4 * 8 * 16)
    # 8 corner loads per warp (2 outer trips x 2 unrolled trips x 2), 4 groups x 4 sectors each, half in the map
    assert counts.gathered_bytes == 1000 * 8 * 16 * 32 * 0.5


def test_time_range_is_the_largest_term_at_best_and_the_sum_at_worst():
    gpu = gpu_model.Gpu(
        "toy",
        10,
        gpu_model.Rate(1e9, 1e9, "Hz", ""),
        gpu_model.Rate(4, 4, "", ""),
        gpu_model.Rate(100, 100, "", ""),
        gpu_model.Rate(1e12, 1e12, "", ""),
        gpu_model.Rate(5e11, 5e11, "", ""),
        gpu_model.Rate(1e10, 1e10, "", ""),
    )
    counts = gpu_model.Counts(0, 4e6, 0, 1e6, 1e4, 1e6, 0)
    low, high, bound = gpu_model.times(counts, gpu)
    issue, l1, l2_low, hbm, atomics, l2_high = 1e-4, 1e-6, 1e-6, 2e-6, 1e-6, 1e-6
    assert bound == "issue" and math.isclose(low, issue)
    assert math.isclose(high, issue + l1 + l2_high + hbm + atomics)
    assert l2_low <= high


def test_triton_layout_is_read_from_the_first_two_dimensional_blocked_layout():
    ttgir = (
        "#blocked1 = #ttg.blocked<{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>\n"
        "#blocked = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [4, 8], warpsPerCTA = [1, 1], "
        "order = [1, 0]}>\n"
    )
    assert gpu_model.triton_layout(ttgir) == (4, 8)
