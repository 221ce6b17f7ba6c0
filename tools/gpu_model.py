"""A speed model of the attention kernels on A100 and H100, from their compiled code, without a GPU.

    python -m tools.gpu_model                                # CUDA (ops/csrc) and Triton kernels, float32
    python -m tools.gpu_model --original PATH/driver.cu      # adds the 2020 kernels from a copy you supply
    python -m tools.gpu_model --dtypes float32 bfloat16 --explain

Per kernel, direction and case (``ops.cases.CASES`` and the COCO encoder at batch 2) it counts, from the SASS:

- **executed instructions**: one warp's path through the kernel is walked (:func:`execute`), every loop for
  its trip count at this case (the per-sample geometry, the loops around the sampling loop and the path the
  backward takes with all three gradients included; a copy of a loop the compiler made for another setting, such
  as the atomics-only copy, is not), and scaled to all warps; reported per sample-channel as thread-instructions
  (32 per warp instruction) over the sampled points times channels a warp computes;
- **bytes**: the value rows gathered (every in-map corner's D channels, through L1; the L2 traffic lies between
  the read-once floor and all of it) and the read-once HBM floor (``tools.sass.floor_elements``);
- **atomic sector operations**: 32-byte sectors touched by the executed RED/ATOM instructions, from the lanes'
  address pattern (a group of lanes owning consecutive bytes of one value row).

These become a time range per GPU: the low end assumes perfect overlap at the optimistic rates (the largest of
the issue, L1, L2, HBM and atomic times, that term naming what bounds the kernel), the high end no overlap at
the pessimistic rates (their sum, with all gathered bytes through L2). Every rate is printed with its source.
Nothing here ran on a GPU: it is a model, to be replaced by ``python -m ops.check`` timings where a GPU is lent.

How a warp's path is found. Branches are decided by the loop they control or by the source line they come from:
a loop's back edge and exits by its trip count (``KernelSpec.loops``: a pattern of the loop's source line and its
trip count at the case; an unrolled loop runs trips // unroll times, the unroll factor being the loop's count of
an anchor instruction over the count per iteration); a forward branch on a loop's line (a guard or remainder test)
toward the code that still has iterations to run; a branch named by ``KernelSpec.branches`` toward the side that
reaches (``seek:``) or does not reach (``avoid:``) an opcode; a branch into a runtime helper call (the slow path
of a 64-bit division) away from it; any other branch falls through (the body of an ``if`` runs: in a warp some
lane needs it). ``--explain`` prints every decision with its source line.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools import sass

_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_WIDTH = re.compile(r"^(?:F|BF|U|S)(\d+)(?:x(\d+))?$")


# ---- a warp's path through a SASS function


@dataclass
class SourceLoop:
    file: str
    line: int  # the `for` line
    last: int  # the last line of its body


def source_lines(file: str) -> list[str]:
    try:
        return Path(file).read_text().splitlines()
    except OSError:
        return []


def loop_extent(lines: list[str], line: int) -> int:
    """The last line of the body of the loop whose header is on ``line`` (1-based): C++ ``for (...) {...}`` or
    ``for (...) statement;``, or a Python ``for ...:`` block."""
    text = lines[line - 1]
    if text.rstrip().endswith(":") and text.lstrip().startswith("for "):  # Python: the indented block below
        indent = len(text) - len(text.lstrip())
        last = line
        for number in range(line + 1, len(lines) + 1):
            body = lines[number - 1]
            if body.strip() and len(body) - len(body.lstrip()) <= indent:
                break
            if body.strip():
                last = number
        return last
    depth, seen_header, number = 0, False, line
    start = text.find("for")
    for number in range(line, len(lines) + 1):
        segment = lines[number - 1][start if number == line else 0 :]
        for char in segment:
            if char in "({":
                depth += 1
            elif char in ")}":
                depth -= 1
                if depth == 0 and seen_header and char == "}":
                    return number
                if depth == 0:
                    seen_header = True
            elif char == ";" and depth == 0 and seen_header:
                return number
    return number


@dataclass
class Path_:
    counts: Counter  # instruction address -> executions by one warp
    decisions: list[str] = field(default_factory=list)


class Walker:
    """Walks one warp through ``instructions`` (one function of ``tools.sass.parse_functions``)."""

    def __init__(
        self,
        instructions: list[sass.Instruction],
        labels: dict[str, int],
        trips: Callable[[str], int | None],
        anchors: Callable[[str], tuple[str, int] | None],
        branches: Callable[[str], str | None],
    ):
        self.code = list(instructions)
        self.index = {ins.address: i for i, ins in enumerate(self.code)}
        self.labels = labels
        self.loops = sass.find_loops(self.code, labels)
        self.trips_of = trips
        self.anchor_of = anchors
        self.rule_of = branches
        self._sources: dict[str, list[str]] = {}
        self.source_loop = {loop.start: self._source_loop(loop) for loop in self.loops}

    # -- source lines

    def texts(self, ins: sass.Instruction) -> list[tuple[tuple[str, int], str]]:
        """(frame, source text) of each line of the instruction's inlining chain, innermost first."""
        found = []
        for frame in ins.frames or ((ins.line,) if ins.line else ()):
            lines = self._sources.setdefault(frame[0], source_lines(frame[0]))
            found.append((frame, lines[frame[1] - 1].strip() if 0 < frame[1] <= len(lines) else ""))
        return found

    def text(self, ins: sass.Instruction, lookup: Callable[[str], object] | None = None) -> str:
        """The innermost source line of the instruction that ``lookup`` knows, else its innermost line in the
        kernel's own file (that of its outermost frame)."""
        texts = self.texts(ins)
        if lookup is not None:
            for _, text in texts:
                if lookup(text) is not None:
                    return text
        return next((text for (file, _), text in texts if file == texts[-1][0][0]), "") if texts else ""

    def _loop_of_line(self, ins: sass.Instruction) -> SourceLoop | None:
        for (file, number), text in self.texts(ins):
            if self.trips_of(text) is not None:
                return SourceLoop(file, number, loop_extent(self._sources[file], number))
        return None

    def _source_loop(self, loop: sass.Loop) -> SourceLoop | None:
        """The source loop of a SASS loop: that of its back edge's line, else of a branch in it that leaves it."""
        candidates = [self.code[self.index[loop.end]]]
        candidates += [ins for ins in loop.instructions if self._is_branch(ins) and not self._inside(loop, ins)]
        for ins in candidates:
            if (found := self._loop_of_line(ins)) is not None:
                return found
        return None

    def in_body(self, ins: sass.Instruction, loop: SourceLoop) -> bool:
        return any(file == loop.file and loop.line < number <= loop.last for (file, number), _ in self.texts(ins))

    # -- control flow

    @staticmethod
    def _is_branch(ins: sass.Instruction) -> bool:
        return (ins.opcode.startswith(("BRA", "CALL.REL")) and _TARGET.search(ins.operands) is not None) or (
            ins.opcode.startswith("EXIT")
        )

    def _target(self, ins: sass.Instruction) -> int | None:
        match = _TARGET.search(ins.operands)
        return self.labels.get(match.group(1)) if match else None

    def _inside(self, loop: sass.Loop, ins: sass.Instruction) -> bool:
        target = self._target(ins)
        return target is not None and loop.start <= target <= loop.end

    def innermost(self, address: int) -> sass.Loop | None:
        around = [loop for loop in self.loops if loop.start <= address <= loop.end]
        return min(around, key=lambda loop: loop.end - loop.start, default=None)

    def unroll(self, loop: sass.Loop) -> int:
        source = self.source_loop[loop.start]
        back_edge = self.code[self.index[loop.end]]
        anchor = self.anchor_of(self.text(back_edge, self.anchor_of)) if source else None
        if anchor is None:
            return 1
        opcode, per_iteration = anchor
        inner = [other for other in self.loops if other is not loop and sass._contains(loop, other)]
        count = sum(
            ins.opcode.startswith(opcode)
            for ins in loop.instructions
            if not any(other.start <= ins.address <= other.end for other in inner)
        )
        return max(1, count // per_iteration)

    def reach(self, start: int, low: int, high: int) -> list[sass.Instruction]:
        """Instructions reachable from index ``start`` by forward edges only, within addresses [low, high]."""
        seen, stack = set(), [start]
        while stack:
            i = stack.pop()
            if i in seen or i >= len(self.code) or not low <= self.code[i].address <= high:
                continue
            seen.add(i)
            ins = self.code[i]
            if ins.opcode.startswith("EXIT") and not ins.predicate:
                continue
            target = self._target(ins) if self._is_branch(ins) else None
            if target is not None and target > ins.address and target in self.index:
                stack.append(self.index[target])
            if not (target is not None and not ins.predicate) or ins.opcode.startswith("CALL"):
                stack.append(i + 1)
        return [self.code[i] for i in sorted(seen)]

    def execute(self, max_steps: int = 2_000_000) -> Path_:
        path = Path_(Counter())
        iteration: dict[int, int] = {}
        planned: dict[int, int] = {}  # SASS loop start -> trips planned for this entry
        done: Counter = Counter()  # (file, line) of a source loop -> iterations done in the enclosing entry
        i, previous = 0, None
        for _ in range(max_steps):
            if i >= len(self.code):
                return path
            ins = self.code[i]
            for loop in self.loops:
                if loop.start == ins.address:
                    self._arrive(loop, previous, iteration, planned, done)
            path.counts[ins.address] += 1
            previous = ins.address
            if ins.opcode.startswith("EXIT"):
                if not ins.predicate or self._decide(ins, None, iteration, planned, done, path):
                    return path
                i += 1
            elif self._is_branch(ins):
                target = self._target(ins)
                taken = not ins.predicate or self._decide(ins, target, iteration, planned, done, path)
                i = self.index[target] if taken else i + 1
            else:
                i += 1
        raise RuntimeError(f"no EXIT after {max_steps} instructions: a loop's trip count is missing or wrong")

    def _arrive(self, loop, previous, iteration, planned, done) -> None:
        if previous is not None and loop.start <= previous <= loop.end:
            iteration[loop.start] += 1
        else:
            iteration[loop.start] = 1
            source = self.source_loop[loop.start]
            if source is None:
                raise ValueError(
                    f"no trip count for the loop at {loop.start:#06x}: its line is "
                    f"{self.text(self.code[self.index[loop.end]])!r} (its inlining chain: "
                    f"{[text for _, text in self.texts(self.code[self.index[loop.end]])]})"
                )
            remaining = self.trips_of_loop(source) - done[(source.file, source.line)]
            planned[loop.start] = max(0, remaining // self.unroll(loop))
        for inner in self.loops:  # a new trip of this loop starts its inner loops afresh
            if inner is not loop and sass._contains(loop, inner) and self.source_loop[inner.start]:
                source = self.source_loop[inner.start]
                done[(source.file, source.line)] = 0

    def trips_of_loop(self, source: SourceLoop) -> int:
        lines = self._sources.setdefault(source.file, source_lines(source.file))
        return self.trips_of(lines[source.line - 1].strip())

    def _decide(self, ins, target, iteration, planned, done, path) -> bool:
        """Whether the conditional branch (or EXIT, target None) ``ins`` is taken by the warp."""
        loop = self.innermost(ins.address)
        text = self.text(ins, self.rule_of) if self.text(ins, self.rule_of) else self.text(ins, self.trips_of)
        if loop is not None:
            source = self.source_loop[loop.start]
            back = target == loop.start
            leaves = target is None or not loop.start <= target <= loop.end  # an EXIT in a loop leaves it too
            if back or leaves:
                more = iteration[loop.start] < planned[loop.start]
                if not more and source is not None:  # the loop ends: its iterations are done
                    done[(source.file, source.line)] += planned[loop.start] * self.unroll(loop)
                taken = more if back else not more
                path.decisions.append(f"{ins.address:#06x} loop {'continues' if more else 'ends'}: {text}")
                return taken
        low, high = (loop.start, loop.end) if loop is not None else (0, self.code[-1].address)
        fall = self.reach(self.index[ins.address] + 1, low, high)
        jump = self.reach(self.index[target], low, high) if target is not None and target in self.index else []
        common = {x.address for x in fall} & {x.address for x in jump}  # past the point where both sides meet
        fall, jump = [x for x in fall if x.address not in common], [x for x in jump if x.address not in common]
        if target is None:  # a predicated EXIT: the warp leaves only where a rule or a loop with no trips says so
            source = self._loop_of_line(ins)
            if self.rule_of(text) is not None:
                choice = self.rule_of(text) == "taken"
            else:
                choice = source is not None and self.trips_of_loop(source) - done[(source.file, source.line)] <= 0
        else:
            choice = self._choose(ins, text, fall, jump, done, default=False)
        path.decisions.append(f"{ins.address:#06x} {'taken' if choice else 'falls through'}: {text}")
        return choice

    def _choose(self, ins, text, fall, jump, done, default: bool) -> bool:
        """True for the jump side, False for the fall-through side (each: what only it reaches)."""
        rule = self.rule_of(text)
        if rule is not None:
            kind, _, opcode = rule.partition(":")
            if kind in ("seek", "avoid"):
                has_fall = any(other.opcode.startswith(opcode) for other in fall)
                has_jump = any(other.opcode.startswith(opcode) for other in jump)
                if has_fall != has_jump:
                    return has_jump if kind == "seek" else has_fall
                return default
            return kind == "taken"
        # a guard or remainder test of a loop: of the branch's own line, else of a loop nested right here
        own = self._loop_of_line(ins)
        for source in [own] if own is not None else self._child_loops(ins.address):
            decided = self._guard(source, fall, jump, done)
            if decided is not None:
                return decided
        fall_call, jump_call = (
            any(x.opcode.startswith("CALL") and "$" in x.operands for x in side) for side in (fall, jump)
        )
        if fall_call != jump_call:
            return fall_call
        return default

    def _child_loops(self, address: int) -> list[SourceLoop]:
        """The source loops of the SASS loops directly inside the innermost loop around ``address``."""
        outer = self.innermost(address)
        children = []
        for loop in self.loops:
            if loop is outer or (outer is not None and not sass._contains(outer, loop)):
                continue
            between = [x for x in self.loops if x is not loop and x is not outer and sass._contains(x, loop)]
            if outer is not None:
                between = [x for x in between if sass._contains(outer, x)]
            source = self.source_loop[loop.start]
            if not between and source is not None and source not in children:
                children.append(source)
        return children

    def _guard(self, source: SourceLoop, fall, jump, done) -> bool | None:
        """Toward the loop (or its remainder) while it has iterations left, past it when it has none."""
        remaining = self.trips_of_loop(source) - done[(source.file, source.line)]
        loops = [loop for loop in self.loops if self.source_loop[loop.start] == source]
        for loop in sorted((loop for loop in loops if self.unroll(loop) <= remaining), key=self.unroll, reverse=True):
            fall_has, jump_has = (any(x.address == loop.start for x in side) for side in (fall, jump))
            if fall_has != jump_has:
                return jump_has
        for loop in loops:  # an unrolled loop with more iterations per trip than are left: around it
            fall_has, jump_has = (any(x.address == loop.start for x in side) for side in (fall, jump))
            if fall_has != jump_has and self.unroll(loop) > remaining:
                return fall_has
        fall_body, jump_body = (any(self.in_body(x, source) for x in side) for side in (fall, jump))
        if fall_body != jump_body:
            return jump_body if remaining > 0 else fall_body
        return None


# ---- what the instructions move


def access_width(opcode: str) -> int:
    """Bytes per lane of a global load, RED or ATOM: LDG by ``tools.sass.load_width``; RED/ATOM by their type
    (``RED.E.ADD.F32`` 4, ``REDG.E.ADD.F32x4`` 16, ``RED.E.ADD.F64`` 8, ``ATOM.E.ADD.F16x2`` 4)."""
    if opcode.startswith(("LDG", "LD.")):
        return sass.load_width(opcode) // 8
    for part in opcode.split(".")[1:]:
        if match := _WIDTH.match(part):
            return int(match.group(1)) * int(match.group(2) or 1) // 8
    return 4


def sectors_per_group(group_lanes: int, lane_stride: int, width: int) -> int:
    """32-byte sectors one instruction touches for a group of lanes whose lane k accesses ``width`` bytes at
    ``k * lane_stride`` (from a 32-byte aligned row start)."""
    sectors = set()
    for lane in range(group_lanes):
        first = lane * lane_stride
        sectors.update(range(first // 32, (first + width - 1) // 32 + 1))
    return len(sectors)


# ---- the kernels and the cases


@dataclass(frozen=True)
class Launch:
    """One kernel at one case: the shapes and the kernel's own work split."""

    batch: int
    positions: int
    queries: int
    heads: int
    channels: int
    levels: int
    points: int
    element_size: int  # bytes of the value dtype
    accumulate_size: int  # bytes of the value gradient's accumulator

    @property
    def samples(self) -> int:
        return self.levels * self.points


@dataclass
class KernelSpec:
    """What the model needs to know of a kernel beyond its SASS, read from its source."""

    label: str  # row name
    direction: str  # "forward" or "backward"
    function: str  # the short name of the SASS function (``tools.sass.short_name``)
    loops: dict[str, Callable[[Launch], int]]  # source-line pattern -> trips per entry
    anchors: dict[str, tuple[str, int]]  # loop source-line pattern -> (opcode, count per iteration)
    branches: dict[str, str]  # source-line pattern -> "seek:OPCODE" | "avoid:OPCODE" | "taken" | "fallthrough"
    gather: str  # pattern of the source lines whose loads gather value rows
    atomics: str  # pattern of the source lines whose RED/ATOM add into the value gradient
    lanes: Callable[[Launch], int]  # lanes that share one value row in a load
    lane_bytes: Callable[[Launch], int]  # bytes of the row each lane owns (its stride; 0: the access's width)
    atomic_lane_bytes: Callable[[Launch], int]  # the same for the value gradient's accumulator
    warps: Callable[[Launch], int]  # warps of the launch
    sample_channels_per_warp: Callable[[Launch], int]

    def lookup(self, table: dict, text: str):
        return next((value for pattern, value in table.items() if re.search(pattern, text)), None)


def _cuda_vector(launch: Launch) -> int:
    return 16 // launch.element_size if launch.channels % (16 // launch.element_size) == 0 else 1


def _cuda_lanes(launch: Launch) -> int:
    chunks = launch.channels // _cuda_vector(launch)
    return min(32, 1 << max(0, chunks - 1).bit_length())


_CUDA_COMMON = {
    "lanes": _cuda_lanes,
    "lane_bytes": lambda launch: _cuda_vector(launch) * launch.element_size,
    # the value gradient's atomics have a layout of their own in which every instruction fills whole sectors
    "atomic_lane_bytes": lambda launch: 0,
    "warps": lambda launch: math.ceil(launch.batch * launch.queries * launch.heads * _cuda_lanes(launch) / 32),
    "sample_channels_per_warp": lambda launch: 32 // _cuda_lanes(launch) * launch.samples * launch.channels,
}
_CUDA_LOOPS = {
    r"for \(int chunk_base = 0;": lambda launch: math.ceil(
        launch.channels / _cuda_vector(launch) / _cuda_lanes(launch)
    ),
    r"for \(int first = 0; first < samples": lambda launch: math.ceil(launch.samples / _cuda_lanes(launch)),
    r"for \(int k = 0; k < count;": lambda launch: min(_cuda_lanes(launch), launch.samples),
    r"for \(int round = 0; round < rounds;": lambda launch: 1,
    r"for \(int step = p\.lanes >> 1;": lambda launch: _cuda_lanes(launch).bit_length() - 1,
}


def cuda_specs(label: str, dtype: str) -> list[KernelSpec]:
    """The kernels of ``ops/csrc/ms_deform_attn_cuda_kernels.h`` that D = 32 runs: the widest vector."""
    template = {"float32": "float", "bfloat16": "c10::BFloat16", "float64": "double"}[dtype]
    vector = {"float32": 4, "bfloat16": 8, "float64": 2}[dtype]
    return [
        KernelSpec(
            label=label,
            direction="forward",
            function=f"forward_kernel<{template}, {vector}>",
            loops=_CUDA_LOOPS,
            anchors={r"for \(int k = 0; k < count;": ("SHFL.IDX", 8)},  # 4 offsets + 4 weights per sample
            branches={},
            gather=r"load_vector<V>\(value \+",
            atomics=r"$^",
            **_CUDA_COMMON,
        ),
        KernelSpec(
            label=label,
            direction="backward",
            function=f"backward_kernel<{template}, {vector}, true>",
            loops=_CUDA_LOOPS,
            anchors={r"for \(int k = 0; k < count;": ("SHFL.IDX", 7)},  # 4 offsets, dh, dw, attention
            # the compiler tests want_sampling once per corner loop: take the copy that loads the corners
            branches={r"for \(int c = 0; c < 4; \+\+c\) \{": "seek:LDG"},
            gather=r"load_vector<V>\(value \+",
            atomics=r"add_in_atomic_layout|atomic_add",
            **_CUDA_COMMON,
        ),
    ]


@dataclass(frozen=True)
class TritonTile:
    """A Triton program's tile and how its warps hold it (the first 2-D ``#ttg.blocked`` layout of the TTGIR)."""

    block_queries: int
    block_channels: int
    warps: int
    elements_per_lane: int  # consecutive channels a lane holds (sizePerThread[1])
    lanes_per_row: int  # lanes of a warp along the channels of one query (threadsPerWarp[1])


def triton_layout(ttgir: str) -> tuple[int, int]:
    """(elements per lane, lanes per row) of the first 2-D blocked layout in a TTGIR listing."""
    match = re.search(r"sizePerThread = \[(\d+), (\d+)\], threadsPerWarp = \[(\d+), (\d+)\]", ttgir)
    if match is None:
        raise ValueError("no 2-D blocked layout in the TTGIR")
    return int(match.group(2)), int(match.group(4))


def triton_spec(direction: str, tile: TritonTile) -> KernelSpec:
    """A kernel of ``ops/triton_kernels.py``: a program is BLOCK_Q queries x BLOCK_D channels of one head on
    ``tile.warps`` warps, each lane holding ``elements_per_lane`` consecutive channels of a query row that
    ``lanes_per_row`` lanes share."""
    return KernelSpec(
        label="triton",
        direction=direction,
        function=f"ms_deform_attn_{direction}_kernel",
        loops={
            r"for level in range\(levels\)": lambda launch: launch.levels,
            r"for point in range\(points\)": lambda launch: launch.points,
        },
        anchors={},
        branches={},
        gather=r"_gather\(|_backward_corner\(",  # the lines of the kernel that call them
        atomics=r"_backward_corner\(",
        lanes=lambda launch: tile.lanes_per_row,
        lane_bytes=lambda launch: 0,  # Triton lays each access out for itself: a lane's bytes are contiguous with
        atomic_lane_bytes=lambda launch: 0,  # the next lane's (0: the instruction's width)
        warps=lambda launch: launch.batch * math.ceil(launch.queries / tile.block_queries) * launch.heads * tile.warps,
        sample_channels_per_warp=lambda launch: tile.block_queries * tile.block_channels // tile.warps * launch.samples,
    )


def original_specs() -> list[KernelSpec]:
    """The 2020 kernels, float32, from a copy of their source the user supplies (not in this repository): one
    thread per (batch, query, head, channel) in a grid-stride loop, a loop over levels and one over points, four
    scalar loads per point and, in the backward, four scalar atomics per point and a block reduction of the
    location and weight gradients by thread 0 (blockSize = D threads)."""
    one_thread_per_channel = {
        "lanes": lambda launch: min(32, launch.channels),
        "lane_bytes": lambda launch: launch.element_size,
        "atomic_lane_bytes": lambda launch: launch.accumulate_size,
        "warps": lambda launch: math.ceil(launch.batch * launch.queries * launch.heads * launch.channels / 32),
        "sample_channels_per_warp": lambda launch: 32 * launch.samples,
    }
    loops = {
        r"CUDA_KERNEL_LOOP": lambda launch: 1,
        r"for \(int l_col\s*=\s*0": lambda launch: launch.levels,
        r"for \(int p_col\s*=\s*0": lambda launch: launch.points,
        r"for \(unsigned int tid = 1; tid < blockSize": lambda launch: launch.channels - 1,
    }
    return [
        KernelSpec(
            label="original",
            direction="forward",
            function="ms_deformable_im2col_gpu_kernel<float>",
            loops=loops,
            anchors={},
            branches={},
            gather=r"im2col_bilinear",
            atomics=r"$^",
            **one_thread_per_channel,
        ),
        KernelSpec(
            label="original",
            direction="backward",
            function="ms_deformable_col2im_gpu_kernel_shm_blocksize_aware_reduce_v1<float, 32u>",
            loops=loops,
            anchors={},
            branches={},
            gather=r"col2im_bilinear",
            atomics=r"col2im_bilinear",
            **one_thread_per_channel,
        ),
    ]


# ---- counting one kernel at one case


@dataclass
class Counts:
    """What one kernel does at one case, summed over its warps."""

    instructions_per_sample_channel: float
    warp_instructions: float
    gathered_bytes: float  # value rows through L1 (in-map corners only)
    loaded_bytes: float  # every global load through L1
    atomic_sectors: float
    floor_bytes: float  # read-once HBM traffic
    warps: int


def walk(instructions, labels, spec: KernelSpec, launch: Launch) -> tuple[Walker, Path_]:
    walker = Walker(
        instructions,
        labels,
        trips=lambda text: (lambda rule: rule(launch) if rule else None)(spec.lookup(spec.loops, text)),
        anchors=lambda text: spec.lookup(spec.anchors, text),
        branches=lambda text: spec.lookup(spec.branches, text),
    )
    return walker, walker.execute()


def count(
    instructions, labels, spec: KernelSpec, launch: Launch, inside: float, floor_bytes: float
) -> tuple[Counts, Path_]:
    """``inside``: the share of the sampled corners that lie in their map (the others are never loaded)."""
    walker, path = walk(instructions, labels, spec, launch)
    by_address = {ins.address: ins for ins in instructions}
    warps = spec.warps(launch)
    per_warp = sum(path.counts.values())
    lanes = spec.lanes(launch)
    gathered = loaded = atomics = 0.0
    for address, executions in path.counts.items():
        ins = by_address[address]
        texts = [text for _, text in walker.texts(ins)]
        width = access_width(ins.opcode)
        if ins.opcode.startswith("LDG"):
            if any(re.search(spec.gather, text) for text in texts):
                sectors = 32 // lanes * sectors_per_group(lanes, spec.lane_bytes(launch) or width, width)
                gathered += executions * sectors * 32 * inside
            else:  # locations, weights, shapes: one sector per group of lanes (a broadcast or consecutive lanes)
                loaded += executions * 32 // lanes * 32
        elif ins.opcode.startswith(("RED", "ATOM")) and any(re.search(spec.atomics, text) for text in texts):
            sectors = 32 // lanes * sectors_per_group(lanes, spec.atomic_lane_bytes(launch) or width, width)
            atomics += executions * sectors * inside
    counts = Counts(
        instructions_per_sample_channel=per_warp * 32 / spec.sample_channels_per_warp(launch),
        warp_instructions=per_warp * warps,
        gathered_bytes=gathered * warps,
        loaded_bytes=(gathered + loaded) * warps,
        atomic_sectors=atomics * warps,
        floor_bytes=floor_bytes,
        warps=warps,
    )
    return counts, path


# ---- time on a GPU


@dataclass(frozen=True)
class Rate:
    low: float
    high: float
    unit: str
    source: str


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock: Rate  # Hz
    issue: Rate  # warp instructions per clock per SM
    l1: Rate  # bytes per clock per SM
    l2: Rate  # bytes/s
    hbm: Rate  # bytes/s
    atomics: Rate  # sector operations/s

    def rates(self) -> list[tuple[str, Rate]]:
        return [(name, getattr(self, name)) for name in ("clock", "issue", "l1", "l2", "hbm", "atomics")]


_WHITEPAPER_A100 = "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020)"
_WHITEPAPER_H100 = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022)"
GPUS = (
    Gpu(
        "A100",
        108,
        Rate(1.275e9, 1.41e9, "Hz", f"boost 1410 MHz ({_WHITEPAPER_A100}); low end: 10% below it under power limits"),
        Rate(4, 4, "warp instr/clk/SM", "4 SM sub-partitions, one warp scheduler dispatching 1 instr/clk each"),
        Rate(128, 128, "B/clk/SM", "L1 load bandwidth, 128 B/clk/SM (32 banks x 4 B)"),
        Rate(
            3.8e12,
            4.9e12,
            "B/s",
            "2.3x V100's L2 read bandwidth (whitepaper) x V100's 2.1 TB/s (Jia et al., "
            "Dissecting Volta, 2018); low end 3.8 TB/s",
        ),
        Rate(0.9 * 2.039e12, 2.039e12, "B/s", "HBM2e 2039 GB/s, A100 SXM4 80 GB datasheet; low end 90% of it"),
        Rate(
            3.8e12 / 64,
            4.9e12 / 32,
            "sectors/s",
            "assumption (no vendor figure): one 32-B sector reduction costs one to two L2 sector accesses",
        ),
    ),
    Gpu(
        "H100",
        132,
        Rate(1.755e9, 1.98e9, "Hz", f"max boost 1980 MHz (H100 SXM5 datasheet, {_WHITEPAPER_H100}); low end 1755 MHz"),
        Rate(4, 4, "warp instr/clk/SM", "4 SM sub-partitions, one warp scheduler dispatching 1 instr/clk each"),
        Rate(128, 128, "B/clk/SM", "L1 load bandwidth, 128 B/clk/SM (33 TB/s over 132 SMs at 1.98 GHz)"),
        Rate(
            5.5e12,
            7.2e12,
            "B/s",
            "no vendor figure: 5.5 TB/s measured on H100 PCIe (chipsandcheese, 2023), "
            "scaled to SXM5's SMs and clock: 7.2 TB/s",
        ),
        Rate(0.9 * 3.35e12, 3.35e12, "B/s", "HBM3 3.35 TB/s, H100 SXM5 datasheet; low end 90% of it"),
        Rate(
            5.5e12 / 64,
            7.2e12 / 32,
            "sectors/s",
            "assumption (no vendor figure): one 32-B sector reduction costs one to two L2 sector accesses",
        ),
    ),
)


# fewer warps than this per SM (of 64 resident) hide memory latency poorly: the model's rates are then too high
FEW_WARPS_PER_SM = 16


def times(counts: Counts, gpu: Gpu) -> tuple[float, float, str]:
    """(low, high) seconds and what bounds the low end: the largest of the issue, L1, L2, HBM and atomic times at
    the optimistic rates (perfect overlap; L2 moves only the read-once bytes), against their sum at the
    pessimistic ones (no overlap; every gathered byte crosses L2)."""
    optimistic = {
        "issue": counts.warp_instructions / (gpu.sms * gpu.issue.high * gpu.clock.high),
        "L1": counts.loaded_bytes / (gpu.sms * gpu.l1.high * gpu.clock.high),
        "L2": counts.floor_bytes / gpu.l2.high,
        "HBM": counts.floor_bytes / gpu.hbm.high,
        "atomics": counts.atomic_sectors / gpu.atomics.high,
    }
    pessimistic = {
        "issue": counts.warp_instructions / (gpu.sms * gpu.issue.low * gpu.clock.low),
        "L1": counts.loaded_bytes / (gpu.sms * gpu.l1.low * gpu.clock.low),
        "L2": counts.loaded_bytes / gpu.l2.low,
        "HBM": counts.floor_bytes / gpu.hbm.low,
        "atomics": counts.atomic_sectors / gpu.atomics.low,
    }
    bound = max(optimistic, key=optimistic.get)
    return optimistic[bound], sum(pessimistic.values()), bound


# ---- the cases, the compiled kernels, the table


@dataclass(frozen=True)
class ModelCase:
    name: str
    batch: int
    level_shapes: tuple[tuple[int, int], ...]
    queries: int | None  # None: one per position


def model_cases() -> list[ModelCase]:
    """``ops.cases.CASES`` and the COCO encoder at batch 2 (800x1333 images, N=2, S=Lq=22,223)."""
    from ops.cases import CASES

    cases = [ModelCase(case.name, case.batch, case.level_shapes, case.queries) for case in CASES.values()]
    coco = CASES["coco_encoder"]
    return [*cases, ModelCase("coco_encoder N=2", 2, coco.level_shapes, None)]


def corners_inside(case: ModelCase) -> float:
    """The share of sampled corners inside their map, for the inputs ``ops.cases.make_inputs`` draws (as the
    model samples: a reference point plus offsets of a few pixels)."""
    import torch

    from ops import cases

    inputs = cases.make_inputs(cases.Case(case.name, case.batch, case.level_shapes, case.queries), "cpu", torch.float32)
    shapes = inputs["spatial_shapes"].double()
    height, width = shapes[:, 0].view(1, 1, 1, -1, 1), shapes[:, 1].view(1, 1, 1, -1, 1)
    x = inputs["sampling_locations"][..., 0].double() * width - 0.5
    y = inputs["sampling_locations"][..., 1].double() * height - 0.5
    inside = 0.0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        column, row = x.floor() + dx, y.floor() + dy
        inside += float(((column >= 0) & (column < width) & (row >= 0) & (row < height)).double().mean()) / 4
    return inside


def launch_of(case: ModelCase, dtype: str) -> Launch:
    from ops.cases import CHANNELS, HEADS, POINTS

    positions = sum(h * w for h, w in case.level_shapes)
    size = {"float32": 4, "bfloat16": 2, "float64": 8}[dtype]
    return Launch(
        batch=case.batch,
        positions=positions,
        queries=positions if case.queries is None else case.queries,
        heads=HEADS,
        channels=CHANNELS,
        levels=len(case.level_shapes),
        points=POINTS,
        element_size=size,
        accumulate_size=8 if dtype == "float64" else 4,
    )


def floor_bytes(launch: Launch, direction: str) -> float:
    forward, backward = sass.floor_elements(launch.batch, launch.positions, launch.queries, launch.levels)
    return (forward if direction == "forward" else backward) * launch.element_size


def disassemble(cubin: Path) -> tuple[dict, dict, dict]:
    """({mangled: instructions}, {mangled: labels}, {mangled: short name}) of a cubin."""
    listing = subprocess.run(
        [sass.find_tool("nvdisasm"), "-c", "-gi", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    functions = sass.parse_functions(listing)
    names = sass.demangle(sorted(functions))
    return functions, sass.label_addresses(listing), {name: sass.short_name(names[name]) for name in functions}


def cuda_kernels(source: Path, arch: str, workdir: Path) -> tuple[dict, dict, dict]:
    cubin = workdir / f"{source.stem}_sm{arch}.cubin"
    print(f"compiling {source} for sm_{arch} ...", file=sys.stderr, flush=True)
    sass.compile_cubin(source, arch, cubin, [source.parent, sass.CSRC])
    return disassemble(cubin)


def triton_kernels(dtype: str, arch: str, workdir: Path, queries: int) -> tuple[tuple[dict, dict, dict], list]:
    """The Triton kernels compiled for ``sm_{arch}`` at the tile ``ops.triton_backend`` launches for ``queries``."""
    from ops import triton_backend
    from ops import triton_kernels as kernels
    from tools import triton_compile

    functions, labels, names, specs = {}, {}, {}, []
    block_queries, block_channels = triton_backend.block_sizes(queries, 32)
    for direction in ("forward", "backward"):
        kernel = getattr(kernels, f"ms_deform_attn_{direction}_kernel")
        print(f"compiling {kernel.__name__} ({dtype}) for sm_{arch} ...", file=sys.stderr, flush=True)
        compiled = triton_compile.compile_kernel(kernel, dtype, int(arch), queries=queries)
        cubin = workdir / f"{kernel.__name__}_{dtype}_sm{arch}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        more_functions, more_labels, more_names = disassemble(cubin)
        functions.update(more_functions)
        labels.update(more_labels)
        names.update(more_names)
        per_lane, lanes = triton_layout(compiled.asm["ttgir"])
        tile = TritonTile(block_queries, block_channels, compiled.metadata.num_warps, per_lane, lanes)
        specs.append(triton_spec(direction, tile))
    return (functions, labels, names), specs


@dataclass
class Row:
    spec: KernelSpec
    case: ModelCase
    dtype: str
    counts: dict[str, Counts]  # arch -> counts


def model_rows(
    kernel_sets: dict[str, tuple[tuple[dict, dict, dict], list[KernelSpec]]],
    case: ModelCase,
    dtype: str,
    inside: float,
    explain: bool,
) -> list[Row]:
    """``kernel_sets``: {arch: (disassembly, specs)}; one row per spec, with the counts of each arch."""
    rows: dict[tuple[str, str], Row] = {}
    launch = launch_of(case, dtype)
    for arch, ((functions, labels, names), specs) in kernel_sets.items():
        for spec in specs:
            mangled = next((name for name, short in names.items() if short == spec.function), None)
            if mangled is None:
                raise SystemExit(f"error: no kernel {spec.function} in the sm_{arch} compile of {spec.label}")
            counts, path = count(
                functions[mangled], labels.get(mangled, {}), spec, launch, inside, floor_bytes(launch, spec.direction)
            )
            if explain:
                print(f"## {spec.label} {spec.direction} {spec.function} sm_{arch}: the warp's decisions")
                print("\n".join(path.decisions[:80]))
            row = rows.setdefault((spec.label, spec.direction), Row(spec, case, dtype, {}))
            row.counts[arch] = counts
    return list(rows.values())


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}" if seconds >= 1e-5 else f"{seconds * 1e6:.1f}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| kernel | direction | case | dtype | instr / sample-channel (sm_80 / sm_90) | gathered MB | HBM floor MB "
        "| atomic sectors M (sm_80 / sm_90) | A100 us | H100 us | bound (A100 / H100) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        a100, h100 = row.counts.get("80"), row.counts.get("90")
        first = a100 or h100
        cells = []
        for counts, gpu in ((a100, GPUS[0]), (h100, GPUS[1])):
            cells.append(times(counts, gpu) if counts else None)
        instructions = " / ".join(f"{c.instructions_per_sample_channel:.1f}" if c else "-" for c in (a100, h100))
        atomics = " / ".join(f"{c.atomic_sectors / 1e6:.1f}" if c else "-" for c in (a100, h100))
        ranges = [f"{_us(low)}-{_us(high)}" if cell else "-" for cell in cells for low, high, _ in [cell or (0, 0, "")]]
        bounds = " / ".join(cell[2] if cell else "-" for cell in cells)
        if first.warps < FEW_WARPS_PER_SM * GPUS[0].sms:
            bounds += f"; {first.warps} warps: latency"
        lines.append(
            f"| {row.spec.label} | {row.spec.direction} | {row.case.name} | {row.dtype} | {instructions} | "
            f"{first.gathered_bytes / 1e6:.0f} | {first.floor_bytes / 1e6:.0f} | {atomics} | {ranges[0]} | "
            f"{ranges[1]} | {bounds} |"
        )
    return lines


def assumptions() -> list[str]:
    lines = ["| GPU | quantity | low | high | unit | source |", "|---|---|---:|---:|---|---|"]
    for gpu in GPUS:
        lines.append(f"| {gpu.name} | SMs | {gpu.sms} | {gpu.sms} | | vendor whitepaper |")
        for name, rate in gpu.rates():
            lines.append(f"| {gpu.name} | {name} | {rate.low:.4g} | {rate.high:.4g} | {rate.unit} | {rate.source} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cuda", type=Path, default=sass.CSRC / "ms_deform_attn_cuda.cu", help="the new kernels")
    parser.add_argument(
        "--original", type=Path, default=None, help="a .cu file instantiating the 2020 kernels for float (not shipped)"
    )
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--explain", action="store_true", help="print each kernel's branch decisions")
    args = parser.parse_args(argv)
    cases = [case for case in model_cases() if args.cases is None or case.name in args.cases]
    rows, shares = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        compiled = {arch: cuda_kernels(args.cuda, arch, workdir) for arch in ("80", "90")}
        original = {arch: cuda_kernels(args.original, arch, workdir) for arch in ("80", "90")} if args.original else {}
        for dtype in args.dtypes:
            sets = [{arch: (compiled[arch], cuda_specs("cuda", dtype)) for arch in compiled}]
            if original and dtype == "float32":
                sets.append({arch: (original[arch], original_specs()) for arch in original})
            if not args.no_triton:
                sets.append({arch: triton_kernels(dtype, arch, workdir, queries=300) for arch in ("80", "90")})
            for case in cases:
                inside = shares.setdefault(case.name, corners_inside(case))
                for kernel_sets in sets:
                    rows += model_rows(kernel_sets, case, dtype, inside, args.explain)
    print("## Speed model (no GPU ran this: counts from the compiled code, rates below)\n")
    print("\n".join(table(rows)))
    print("\nCases (M=8, D=32, L=P=4; inputs drawn as ops.cases.make_inputs draws them):\n")
    print("| case | N | S | Lq | corners in the map |\n|---|---:|---:|---:|---:|")
    for case in cases:
        launch = launch_of(case, "float32")
        print(f"| {case.name} | {launch.batch} | {launch.positions} | {launch.queries} | {shares[case.name]:.3f} |")
    print("\nRates assumed (low end of time uses the high rates, high end the low rates):\n")
    print("\n".join(assumptions()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
