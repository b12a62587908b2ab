"""SASS instructions per element of the mad row kernels' steady-state loops, read from a compiled library.

    python benchmarks/sass_count.py build/libvitmad.so [--cuobjdump PATH]

Runs ``cuobjdump --dump-sass`` and ``--dump-resource-usage`` on a .so or .o holding the CUDA kernels of
vitmad::mad and prints a markdown table with one line per instantiation of ``mad_rows_kernel`` (and of
``mad_rows_direct_kernel``, the fallback for strided keys and long rows): the instructions of its steady-state
loop, the elements one pass of that loop consumes, instructions per element and registers. No GPU is needed,
only the machine code, so the instruction diet of the kernel can be checked where it is built. A toolkit without
cuobjdump (this project's CI machines have nvcc alone) can take it and the nvdisasm it calls from PyPI
(``pip install --target DIR nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``, then ``--cuobjdump`` and ``PATH``);
a CMake build's object file ``csrc/cuda/mad_cuda.cu.o`` is enough.

The steady-state loop is the innermost loop (a backward branch with no other backward branch inside it) that
holds the 16-byte vector loads (LDG.E.128); each such load brings 16 / element-size elements. Where several
innermost loops hold as many such loads (mad_rows_direct_kernel has a fast loop and a general one for grids
narrower than a vector), the shorter one, the fast path, is reported.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

# Itanium-mangled template arguments that say the element type (the first template argument).
DTYPES = {"f": ("float32", 4), "d": ("float64", 8), "N3c104HalfE": ("float16", 2), "N3c108BFloat16E": ("bfloat16", 2)}
KERNEL = re.compile(r"(mad_rows_(?:direct_)?kernel)I(N3c104HalfE|N3c108BFloat16E|f|d)(?:f|d)(\w*?)EEvPKT_")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BRANCH_TARGET = re.compile(r"BRA\s+(?:\S+\s+)?(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)")
VECTOR_LOAD = re.compile(r"\bLDG\.E\.128\b")


@dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    vector_loads: int


def run(cuobjdump: str, flag: str, path: str) -> str:
    done = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{cuobjdump} {flag} {path} failed:\n{done.stderr.strip()}")
    return done.stdout


def variant(mangled: str) -> tuple[str, str, str, int] | None:
    """(kernel, dtype, template tail, element size) of a row kernel's mangled name; None for other kernels."""
    match = KERNEL.search(mangled)
    if match is None:
        return None
    name, dtype_code, tail = match.groups()
    dtype, size = DTYPES[dtype_code]
    return name, dtype, tail, size


def describe(tail: str) -> str:
    """Lanes per row and the renormalisation flag from the template tail: Li8ELb0 (table kernel: lanes,
    mass) or Lb1ELb0 (direct kernel, and the one-warp mad_rows_kernel before it: contiguous keys, mass)."""
    ints = re.findall(r"Li(\d+)E", tail)
    bools = re.findall(r"Lb([01])", tail)
    mass = "mass" if bools and bools[-1] == "1" else "no mass"
    if ints:
        return f"{ints[0]} lanes, {mass}"
    keys = "contiguous keys" if bools and bools[0] == "1" else "strided keys"
    return f"32 lanes, {keys}, {mass}"


def innermost_vector_loop(instructions: list[str]) -> Loop | None:
    """The innermost backward-branch loop with the most 16-byte loads; a loop whose body holds another
    backward branch is not innermost (per-row loops contain the steady-state loop)."""
    addresses = [int(address, 16) for address, _ in instructions]
    index = {address: i for i, address in enumerate(addresses)}
    loops = []
    for i, (_, text) in enumerate(instructions):
        match = BRANCH_TARGET.search(text)
        if match is None:
            continue
        target = int(match.group(1), 16)
        if target >= addresses[i] or target not in index:
            continue
        loops.append((index[target], i))
    best = None
    for start, end in loops:
        if any(start <= s and e <= end and (s, e) != (start, end) for s, e in loops):
            continue
        loads = sum(bool(VECTOR_LOAD.search(text)) for _, text in instructions[start : end + 1])
        # Ties (a kernel with a fast loop and a general one, e.g. for grids narrower than a vector) go to
        # the shorter loop, the fast path that common shapes run.
        if loads and (
            best is None
            or loads > best.vector_loads
            or (loads == best.vector_loads and end - start < best.end - best.start)
        ):
            best = Loop(start, end, loads)
    return best


def registers(resource_usage: str) -> dict[str, int]:
    found = {}
    name = None
    for line in resource_usage.splitlines():
        header = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if header:
            name = header.group(1)
            continue
        reg = re.search(r"\bREG:(\d+)", line)
        if reg and name:
            found[name] = int(reg.group(1))
            name = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", help="shared library or object file with the vitmad CUDA kernels")
    parser.add_argument("--cuobjdump", default=None, help="cuobjdump to run (default: the one on PATH)")
    args = parser.parse_args()

    cuobjdump = args.cuobjdump or shutil.which("cuobjdump")
    if cuobjdump is None or shutil.which(cuobjdump) is None:
        sys.exit("cuobjdump not found: put the CUDA toolkit's bin on PATH or pass --cuobjdump PATH")
    sass = run(cuobjdump, "--dump-sass", args.library)
    regs = registers(run(cuobjdump, "--dump-resource-usage", args.library))

    rows = []
    # cuobjdump prints one section per architecture; the same kernel may appear once per architecture.
    for section in re.split(r"\n\s*Function : ", sass)[1:]:
        mangled = section.split("\n", 1)[0].strip()
        parsed = variant(mangled)
        if parsed is None:
            continue
        kernel, dtype, tail, size = parsed
        instructions = INSTRUCTION.findall(section)
        loop = innermost_vector_loop(instructions)
        if loop is None:
            rows.append((kernel, dtype, describe(tail), "-", "-", "-", regs.get(mangled, "?")))
            continue
        count = loop.end - loop.start + 1
        elements = loop.vector_loads * 16 // size
        rows.append((kernel, dtype, describe(tail), count, elements, f"{count / elements:.2f}", regs.get(mangled, "?")))
    if not rows:
        sys.exit(f"no mad_rows_kernel instantiation found in {args.library}")

    print("| kernel | dtype | variant | loop instructions | elements per pass | instructions per element | registers |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r[0] != "mad_rows_kernel", r[0], r[1], r[2])):
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
