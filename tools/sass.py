"""Static SASS statistics of CUDA kernels: registers, spills, instructions per sample-channel, vector loads.

    python -m tools.sass                                   # ops/csrc/ms_deform_attn_cuda.cu for sm_80 and sm_90
    python -m tools.sass other.cu --label old=ops/csrc/ms_deform_attn_cuda.cu --channels forward=4
    python -m tools.sass --floors                          # the memory floor of the benchmark cases on A100 / H100

No GPU is needed: each source is compiled with ``nvcc -cubin`` (torch's include paths and flags, ``-O3 -lineinfo``,
``-Xptxas -v`` for the spills), ``cuobjdump -res-usage`` gives the registers and ``nvdisasm -gi`` the instructions
with their source lines (for inlined code, the line of the kernel that calls it).

How the inner loop is measured: a loop is a backward branch (``BRA`` to a label at or before it); the sampling loop
of a kernel is the loop with the most global loads (``LDG``) among those that contain no other loop with global
loads (a loop without loads nested in it, such as a shuffle reduction, counts once as part of it). Its static
instruction count (every instruction from the label to the branch, both sides of its ``if``s) is divided by the
sample-channels one trip handles: the compiler's unroll factor (``--unroll NAME=N``, default 1) times the channels
a thread handles per sample (``--channels NAME=N``, default 1: one thread per channel; e.g. 4 with 128-bit float
loads). The unroll factor is read from the listing: the table's evidence column gives the global loads per source
line of the kernel (a loop unrolled u times issues u times the loads of each line) and the shuffles in the loop.
Static counts ignore how often each branch runs; with every corner inside the map, as in most samples, nearly all
of them issue.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "ops" / "csrc"
ARCHS = ("80", "90")
DTYPES = ("float", "c10::BFloat16")
# nominal memory bandwidths in bytes/s (A100 SXM4 80 GB, H100 SXM5)
BANDWIDTHS = {"A100": 2.039e12, "H100": 3.35e12}

_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_LINE = re.compile(r'"([^"]+)", line (\d+)')  # in "//## File ..., line N [inlined at ..., line M]"
_FUNCTION = re.compile(r"^\.text\.(\S+):$")


@dataclass
class Instruction:
    address: int
    opcode: str
    operands: str
    line: tuple[str, int] | None
    predicate: str = ""  # "@P0", "@!P1", "@UP0", ... or "" for an unconditional instruction
    frames: tuple[tuple[str, int], ...] = ()  # the inlining chain, innermost line first, ``line`` last


@dataclass
class Loop:
    start: int  # address of the first instruction (the label)
    end: int  # address of the backward branch
    instructions: list[Instruction] = field(default_factory=list)

    @property
    def loads(self) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.opcode.startswith("LDG")]

    def evidence(self) -> str:
        """What shows the unroll factor: global loads per source line of the kernel (``line:count``) and shuffles."""
        per_line = Counter(ins.line[1] if ins.line else "?" for ins in self.loads)
        shuffles = sum(ins.opcode.startswith("SHFL") for ins in self.instructions)
        loads = " ".join(f"{line}:{count}" for line, count in sorted(per_line.items(), key=str))
        return loads + (f", {shuffles} SHFL" if shuffles else "")


def load_width(opcode: str) -> int:
    """Bits one ``LDG``/``LD`` moves: ``.128``, ``.64``, ``.U16``/``.S16``, ``.U8``/``.S8``, else 32."""
    parts = opcode.split(".")
    for bits in ("128", "64"):
        if bits in parts:
            return int(bits)
    if "U16" in parts or "S16" in parts:
        return 16
    if "U8" in parts or "S8" in parts:
        return 8
    return 32


def parse_functions(listing: str) -> dict[str, list[Instruction]]:
    """``nvdisasm -c [-g]`` output -> {mangled function name: instructions}, labels as instructions' addresses."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    frames: tuple[tuple[str, int], ...] = ()
    fresh = False  # a //## comment came since the last instruction
    for text in listing.splitlines():
        stripped = text.strip()
        if match := _FUNCTION.match(stripped):
            current, frames, fresh = functions.setdefault(match.group(1), []), (), False
        elif current is None:
            continue
        elif stripped.startswith("//##") and (locations := _LINE.findall(stripped)):
            # "inner, line A inlined at outer, line B": a chain may go on in the next comment from its last frame
            chain = tuple((file, int(number)) for file, number in locations)
            frames = frames + chain[1:] if fresh and frames and chain[0] == frames[-1] else chain
            fresh = True
        elif match := _INSTRUCTION.search(stripped):
            predicate = (match.group(2) or "").strip()
            line = frames[-1] if frames else None  # the outermost call site: a line of the kernel
            current.append(
                Instruction(int(match.group(1), 16), match.group(3), match.group(4).strip(), line, predicate, frames)
            )
            fresh = False
    return functions


def label_addresses(listing: str) -> dict[str, dict[str, int]]:
    """{function: {label: address of the instruction after it}}."""
    labels: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    pending: list[str] = []
    for text in listing.splitlines():
        stripped = text.strip()
        if match := _FUNCTION.match(stripped):
            current, pending = labels.setdefault(match.group(1), {}), []
        elif current is None:
            continue
        elif match := _LABEL.match(stripped):
            pending.append(match.group(1))
        elif match := _INSTRUCTION.search(stripped):
            for label in pending:
                current[label] = int(match.group(1), 16)
            pending = []
    return labels


def find_loops(instructions: list[Instruction], labels: dict[str, int]) -> list[Loop]:
    """Every backward branch as a loop (several back edges to one label: the farthest), at least 2 instructions."""
    ends: dict[int, int] = {}
    for ins in instructions:
        if ins.opcode.startswith("BRA") and (target := _BRANCH_TARGET.search(ins.operands)):
            start = labels.get(target.group(1))
            if start is not None and start < ins.address:
                ends[start] = max(ends.get(start, 0), ins.address)
    loops = [Loop(start, end) for start, end in sorted(ends.items())]
    for loop in loops:
        loop.instructions = [
            ins for ins in instructions if loop.start <= ins.address <= loop.end and not ins.opcode.startswith("NOP")
        ]
    return [loop for loop in loops if len(loop.instructions) >= 2]


def _contains(outer: Loop, inner: Loop) -> bool:
    return inner is not outer and outer.start <= inner.start and inner.end <= outer.end


def sampling_loop(loops: list[Loop]) -> Loop | None:
    """The innermost loop that loads from global memory (no loop inside it does), with the most loads (ties: the
    longer one); a loop without loads inside it (a shuffle reduction) is counted as part of it."""
    loading = [loop for loop in loops if loop.loads]
    candidates = [loop for loop in loading if not any(_contains(loop, other) for other in loading)]
    return max(candidates, key=lambda loop: (len(loop.loads), len(loop.instructions)), default=None)


@dataclass
class KernelStats:
    source: str
    kernel: str
    arch: str
    registers: int
    spill_bytes: tuple[int, int]  # stores, loads
    loop_instructions: int | None
    unroll: int
    evidence: str
    channels: int
    loop_loads: Counter
    kernel_loads: Counter

    @property
    def per_sample_channel(self) -> float | None:
        if self.loop_instructions is None:
            return None
        return self.loop_instructions / (self.unroll * self.channels)


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return {name: name for name in names}
    output = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, output.splitlines()))


def short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::forward_kernel<float>(float const*, ...)`` -> ``forward_kernel<float>``."""
    name = re.sub(r"^void ", "", demangled.replace("(anonymous namespace)::", "")).split("(", 1)[0]
    qualified = name.split("<", 1)[0]
    return name[qualified.rfind("::") + 2 :] if "::" in qualified else name


def template_dtype(kernel: str) -> str:
    """``forward_kernel<float>`` -> ``float``; ``col2im<float, 32u>`` -> ``float``."""
    return kernel.split("<", 1)[1].split(",")[0].rstrip(">").strip() if "<" in kernel else ""


def is_forward(kernel: str) -> bool:
    return "forward" in kernel or "im2col" in kernel


def find_tool(name: str) -> str:
    """A CUDA binary utility: on PATH, in $CUDA_HOME/bin, or the copy triton ships."""
    import os

    candidates = [shutil.which(name), str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name)]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError(f"{name} not found on PATH, in $CUDA_HOME/bin or in triton's nvidia backend")


def compile_cubin(source: Path, arch: str, output: Path, includes: list[Path]) -> str:
    """nvcc -cubin with torch's flags; returns ptxas' -v report."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    command = [
        find_tool("nvcc"),
        "-cubin",
        f"-arch=sm_{arch}",
        "-O3",
        "-lineinfo",
        "-std=c++20",
        "-Xptxas",
        "-v",
        "-DTORCH_EXTENSION_NAME=sass_stats",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *COMMON_NVCC_FLAGS,
        *(f"-I{path}" for path in [*include_paths("cuda"), *includes]),
        "-o",
        str(output),
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} for sm_{arch}:\n{result.stderr[-4000:]}")
    return result.stderr


def parse_spills(ptxas_report: str) -> dict[str, tuple[int, int]]:
    """{mangled function: (spill store bytes, spill load bytes)} from ``-Xptxas -v``."""
    spills, current = {}, None
    for line in ptxas_report.splitlines():
        if match := re.search(r"Function properties for (\S+)", line):
            current = match.group(1)
        elif current and (match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spills[current] = (int(match.group(1)), int(match.group(2)))
            current = None
    return spills


def parse_registers(resource_usage: str) -> dict[str, int]:
    registers, current = {}, None
    for line in resource_usage.splitlines():
        if match := re.search(r"Function (\S+):", line):
            current = match.group(1)
        elif current and (match := re.search(r"REG:(\d+)", line)):
            registers[current] = int(match.group(1))
    return registers


def measure(
    label: str,
    source: Path,
    arch: str,
    dtypes: tuple[str, ...],
    channels: dict[str, int],
    unrolls: dict[str, int],
    workdir: Path,
) -> list[KernelStats]:
    """Compile ``source`` for ``sm_{arch}`` and measure its kernels whose first template argument is in ``dtypes``
    (all kernels if empty);
    ``channels``/``unrolls`` {name fragment: count} set a kernel's channels per thread and unroll factor."""
    cubin = workdir / f"{label}_sm{arch}.cubin"
    spills = parse_spills(compile_cubin(source, arch, cubin, [source.parent, CSRC]))
    usage = subprocess.run([find_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True)
    registers = parse_registers(usage.stdout)
    listing = subprocess.run(
        [find_tool("nvdisasm"), "-c", "-gi", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    functions, labels = parse_functions(listing), label_addresses(listing)
    names = demangle(sorted(functions))
    stats = []
    for mangled, instructions in sorted(functions.items(), key=lambda item: short_name(names[item[0]])):
        kernel = short_name(names[mangled])
        if dtypes and template_dtype(kernel) not in dtypes:
            continue
        loop = sampling_loop(find_loops(instructions, labels.get(mangled, {})))
        per_thread = next((count for key, count in channels.items() if key in kernel), 1)
        unroll = next((count for key, count in unrolls.items() if key in kernel), 1)
        stats.append(
            KernelStats(
                source=label,
                kernel=kernel,
                arch=f"sm_{arch}",
                registers=registers.get(mangled, -1),
                spill_bytes=spills.get(mangled, (0, 0)),
                loop_instructions=len(loop.instructions) if loop else None,
                unroll=unroll,
                evidence=loop.evidence() if loop else "-",
                channels=per_thread,
                loop_loads=Counter(load_width(ins.opcode) for ins in loop.loads) if loop else Counter(),
                kernel_loads=Counter(load_width(ins.opcode) for ins in instructions if ins.opcode.startswith("LDG")),
            )
        )
    return stats


def _loads(counter: Counter) -> str:
    return " ".join(f"{count}x{bits}" for bits, count in sorted(counter.items())) or "-"


def stats_table(stats: list[KernelStats], baseline: dict[tuple[str, str], float]) -> list[str]:
    """Markdown rows; ``baseline`` {(arch, dtype): instructions per sample-channel} for the ratio column."""
    lines = [
        "| source | kernel | arch | registers | spill st/ld B | loop instr | unroll x channels "
        "| instr / sample-channel | fwd vs baseline fwd | LDG in loop (count x bits) | LDG.128 / .64 in kernel "
        "| loads per line, shuffles |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for item in stats:
        per = item.per_sample_channel
        base = baseline.get((item.arch, template_dtype(item.kernel))) if is_forward(item.kernel) else None
        ratio = f"{per / base:.2f}" if per is not None and base else "-"
        wide = f"{item.kernel_loads.get(128, 0)} / {item.kernel_loads.get(64, 0)}"
        lines.append(
            f"| {item.source} | `{item.kernel}` | {item.arch} | {item.registers} | {item.spill_bytes[0]}/"
            f"{item.spill_bytes[1]} | {item.loop_instructions if item.loop_instructions is not None else '-'} | "
            f"{item.unroll} x {item.channels} | {f'{per:.1f}' if per is not None else '-'} | {ratio} | "
            f"{_loads(item.loop_loads)} | {wide} | {item.evidence} |"
        )
    return lines


def floor_elements(batch: int, positions: int, queries: int, levels: int) -> tuple[int, int]:
    """(forward, backward) elements that must cross memory once at M=8, D=32, P=4 (ops.cases' shapes).

    Forward: value, (x, y) and weights read, the output written. Backward: value, locations, weights and the output
    gradient read, the three gradients written."""
    from ops.cases import CHANNELS, HEADS, POINTS

    value = batch * positions * HEADS * CHANNELS
    samples = batch * queries * HEADS * levels * POINTS
    output = batch * queries * HEADS * CHANNELS
    return value + 3 * samples + output, 2 * value + 6 * samples + output


def floor_table() -> list[str]:
    """Bytes that must cross memory once, over the nominal bandwidth, for the op benchmark cases and COCO size."""
    from ops.cases import CASES

    cases = [(case.name, case.batch, case.level_shapes, case.queries) for case in CASES.values()]
    coco = CASES["coco_encoder"].level_shapes
    cases.append(("coco_encoder N=2", 2, coco, None))
    lines = [
        "| case | N | S | Lq | dtype | forward MB | fwd+bwd MB | A100 fwd us | A100 fwd+bwd us | H100 fwd us | "
        "H100 fwd+bwd us |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, batch, level_shapes, queries in cases:
        positions = sum(h * w for h, w in level_shapes)
        queries = positions if queries is None else queries
        forward_elements, backward_elements = floor_elements(batch, positions, queries, len(level_shapes))
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            forward, both = forward_elements * size, (forward_elements + backward_elements) * size
            times = [
                f"{bytes_ / bandwidth * 1e6:.1f}" for bandwidth in BANDWIDTHS.values() for bytes_ in (forward, both)
            ]
            lines.append(
                f"| {name} | {batch} | {positions} | {queries} | {dtype} | {forward / 1e6:.1f} | {both / 1e6:.1f} | "
                + " | ".join(times)
                + " |"
            )
    return lines


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        if "=" not in value:
            raise SystemExit(f"error: {what} takes NAME=VALUE, got {value!r}")
        name, _, rest = value.partition("=")
        pairs[name] = rest
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.sass", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sources", nargs="*", type=Path, help="CUDA sources (default: ops/csrc/ms_deform_attn_cuda.cu)")
    parser.add_argument("--label", action="append", default=[], help="LABEL=SOURCE.cu, a named source")
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), help="template arguments to report")
    parser.add_argument("--channels", action="append", default=[], help="NAME=N: channels per thread of a kernel")
    parser.add_argument(
        "--unroll", action="append", default=[], help="NAME=N: the unroll factor of a kernel's sampling loop"
    )
    parser.add_argument("--only", nargs="+", default=None, help="report only kernels whose name contains one of these")
    parser.add_argument("--baseline", default="ms_deformable_im2col_gpu_kernel", help="kernel for the ratio column")
    parser.add_argument("--floors", action="store_true", help="print the memory-floor table and stop")
    args = parser.parse_args(argv)
    if args.floors:
        print("\n".join(floor_table()))
        return 0
    labelled = {name: Path(path) for name, path in _pairs(args.label, "--label").items()}
    for source in args.sources:
        labelled[source.stem] = source
    if not labelled:
        labelled["ops/csrc"] = CSRC / "ms_deform_attn_cuda.cu"
    channels = {name: int(count) for name, count in _pairs(args.channels, "--channels").items()}
    unrolls = {name: int(count) for name, count in _pairs(args.unroll, "--unroll").items()}
    stats = []
    with tempfile.TemporaryDirectory() as workdir:
        for label, source in labelled.items():
            for arch in args.arch:
                print(f"compiling {source} for sm_{arch} ...", file=sys.stderr, flush=True)
                stats += measure(label, source, arch, tuple(args.dtypes), channels, unrolls, Path(workdir))
    baseline = {
        (item.arch, template_dtype(item.kernel)): item.per_sample_channel
        for item in stats
        if args.baseline in item.kernel and item.per_sample_channel
    }
    if args.only:
        stats = [item for item in stats if any(fragment in item.kernel for fragment in args.only)]
    print("\n".join(stats_table(stats, baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
