"""One command for a machine with a GPU and no network: build vitmad for that GPU, test it, sanitise it, time it.

    bash benchmarks/gpu_check.sh OUT [--budget SECONDS] [--skip-build]

Steps, each with its own time limit and all within ``--budget`` (default 470 s, under 8 minutes on one H100 or
H200), every output written to the folder OUT:

1. build     a plain CMake build of this tree for the detected GPU only (``TORCH_CUDA_ARCH_LIST`` from its
             compute capability, ``--no-build-isolation`` in spirit: the installed torch, nothing downloaded);
             the library lands in ``python/vitmad`` and every later step imports ``python/`` (``PYTHONPATH``).
             Without CMake >= 3.26 it compiles the same sources with the same flags directly.
2. sass      ``cuobjdump --dump-sass`` and ``--dump-resource-usage`` of the built library (``sass.log``), and
             ``sass_count.py``'s table of the row kernels' instructions per element (``sass_count.log``).
3. tests     ``pytest tests/ops tests/recording/test_record_cuda.py -k cuda`` with ``VITMAD_REQUIRE_COMPILED=1``
             (needs pytest and hypothesis).
4. bench_op, bench_flash, bench_positions   the ``--device cuda`` kernel benchmarks; they write their sections
             of ``benchmarks/RESULTS.md``, copied to OUT at the end.
5. memcheck, racecheck   ``compute-sanitizer`` on a small set of calls of every CUDA kernel (this script's
             ``--sanitizer-cases``).
6. bench_model   the whole-model benchmark on the GPU.
7. bench_stats, bench_stats_qk   the statistics against MAD alone, ``--device cuda``, in what is left.

Every step runs with ``VITMAD_CUDA_STATS_KERNELS=1``: the CUDA kernels of the statistics (``stats``,
``stats_pos``, ``stats_qk``, ``stats_qk_pos``), which no GPU has run yet, are registered only with it; the tests
then hold them to the CPU kernels and the float64 references, the sanitizers and the model benchmark run them too.

OUT gets ``summary.md`` (step, status, seconds), one ``<step>.log`` per step, ``environment.txt`` and
``RESULTS.md``. Without a GPU the script checks its arguments, says so and exits 0. The exit status is 1 when a
step failed or timed out, else 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# (step, time limit in seconds); a step also stops where the overall budget ends.
LIMITS = {
    "build": 200, "sass": 30, "sass_count": 60, "tests": 180, "memcheck": 90, "racecheck": 90,
    "bench_op": 45, "bench_flash": 90, "bench_positions": 45, "bench_model": 60, "bench_stats": 40,
    "bench_stats_qk": 40,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for every result (created if missing)")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all steps together (default 470)")
    parser.add_argument("--skip-build", action="store_true", help="use the library already in python/vitmad")
    parser.add_argument("--sanitizer-cases", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-for", metavar="ARCH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sanitizer_cases or args.build_for:
        return args
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"OUT must be a folder, got the file {args.out}")
    existing = args.out.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        parser.error(f"OUT {args.out} cannot be created or written ({existing} is not a writable folder)")
    return args


def gpu_capability() -> tuple[str, str] | None:
    """(name, "major.minor") of the first CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def find_cuda_home() -> Path | None:
    """The CUDA toolkit folder (bin/nvcc and include/cuda_runtime.h): $CUDA_HOME, $CUDA_PATH, /usr/local/cuda,
    or above the nvcc on PATH (which may be a wrapper script elsewhere; then one of the others must hold)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for home in filter(None, candidates):
        if (Path(home) / "bin/nvcc").exists() and (Path(home) / "include/cuda_runtime.h").exists():
            return Path(home)
    return None


def find_tool(name: str, cuda_home: Path | None) -> str | None:
    """A CUDA toolkit program: in the toolkit's bin, else on PATH."""
    if cuda_home is not None and (cuda_home / "bin" / name).exists():
        return str(cuda_home / "bin" / name)
    return shutil.which(name)


def cmake_ok() -> str | None:
    """A cmake of version >= 3.26 (the project's minimum), or None."""
    beside_python = Path(sys.executable).parent / "cmake"  # pip's cmake in a virtual environment
    cmake = str(beside_python) if beside_python.exists() else shutil.which("cmake")
    if cmake is None:
        return None
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout.split()
    parts = version[2].split(".") if len(version) > 2 else ["0", "0"]
    return cmake if (int(parts[0]), int(parts[1])) >= (3, 26) else None


def build(arch: str, build_dir: Path) -> None:
    """Puts ``_vitmad_ops.so`` for ``arch`` (TORCH_CUDA_ARCH_LIST spelling) into python/vitmad: CMake when a
    recent one is installed, else the same sources compiled with CMakeLists.txt's flags, in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    cuda_home = find_cuda_home()
    if cuda_home is None:
        sys.exit("gpu_check: no CUDA toolkit found ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda, nvcc on PATH)")
    nvcc = str(cuda_home / "bin/nvcc")
    build_dir.mkdir(parents=True, exist_ok=True)
    cmake = cmake_ok()
    if cmake is not None:
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        steps = [[[cmake, "-S", str(ROOT), "-B", str(build_dir), *generator, "-DVITMAD_WITH_CUDA=ON",
                   f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_CUDA_COMPILER={nvcc}"]],
                 [[cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 4)]]]
    else:
        print(f"gpu_check: no CMake >= 3.26, compiling directly with {nvcc} and g++", flush=True)
        steps = direct_build_steps(arch, cuda_home, build_dir)
    for commands in steps:  # the commands of one step run in parallel
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
            for command, code in zip(commands, pool.map(lambda c: subprocess.run(c).returncode, commands)):
                if code != 0:
                    sys.exit(f"gpu_check: build command failed with status {code}: {' '.join(command)}")


def direct_build_steps(arch: str, cuda_home: Path, build_dir: Path) -> list[list[list[str]]]:
    """Without CMake: compile every source of CMakeLists.txt with its flags (one step), then link."""
    import torch

    torch_dir = Path(torch.__file__).parent
    nvcc = str(cuda_home / "bin/nvcc")
    includes = [f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}",
                f"-I{cuda_home / 'include'}", f"-I{sysconfig.get_paths()['include']}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    common = [*includes, abi, "-DVITMAD_WITH_CUDA", "-O3", "-DNDEBUG"]
    sm = arch.replace(".", "")
    commands, objects = [], []
    print(f"gpu_check: direct build for sm_{sm}", flush=True)
    for source in sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc/cpu").glob("*.cpp")):
        objects.append(str(build_dir / (source.stem + ".o")))
        commands.append(["g++", "-std=c++20", "-fPIC", "-fopenmp", "-fopenmp-simd", *common, "-c", str(source),
                         "-o", objects[-1]])
    for source in sorted((ROOT / "csrc/cuda").glob("*.cu")):
        objects.append(str(build_dir / (source.stem + ".cu.o")))
        commands.append([nvcc, "-std=c++20", "-Xcompiler=-fPIC", "-Xcompiler=-fopenmp-simd", *common,
                         f"-gencode=arch=compute_{sm},code=sm_{sm}", "--expt-relaxed-constexpr",
                         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-prec-sqrt=false",
                         "-c", str(source), "-o", objects[-1]])
    link = ["g++", "-shared", "-fopenmp", *objects, f"-L{torch_dir / 'lib'}", f"-L{cuda_home / 'lib64'}", "-lc10",
            "-ltorch_cpu", "-lc10_cuda", "-ltorch_cuda", "-lcudart", f"-Wl,-rpath,{torch_dir / 'lib'}",
            "-o", str(ROOT / "python/vitmad/_vitmad_ops.so")]
    return [commands, [link]]


def run_sanitizer_cases(device: str = "cuda") -> None:
    """Small calls of every CUDA kernel (mad, mad_backward, mad_qk, the statistics; grid and position form; each
    dtype; float and bool bias, renormalised or not), synchronised, for compute-sanitizer. The mad kernels each get
    their input: contiguous rows (the table kernel), a transposed view (the columns kernel), every other key (the
    direct kernel, strided keys) and rows beyond the distance table (the direct kernel, contiguous keys); mad_qk gets
    q / k of D = 36 sliced from D = 40 (no 16-byte copies). ``device="cpu"`` makes the same calls on the CPU
    kernels: the test that they are all valid calls (tests/ops/test_gpu_check.py)."""
    import torch

    import vitmad

    assert vitmad.backend() == "compiled", vitmad.backend()
    gen = torch.Generator().manual_seed(0)
    n, d, grid = 1 + 10 * 7, 40, [10, 7]
    long_n, long_grid = 1 + 56 * 56, [56, 56]  # 3,136 patches: past the 96 KiB distance table of mad_cuda.cu
    positions = vitmad.grid_positions(*grid, 16, num_prefix_tokens=1, device=device)
    times = torch.where(positions[:, :1].isnan(), positions[:, :1], (torch.arange(n, device=device) % 3)[:, None])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        attn = torch.randn(2, 3, n, n, generator=gen).softmax(-1).to(device, dtype)
        views = {
            "rows": (attn, grid),
            "transposed": (attn.transpose(-1, -2).contiguous().transpose(-1, -2), grid),
            "strided": (torch.rand(2, 3, 2 * n, 2 * n, generator=gen).to(device, dtype)[..., ::2, ::2], grid),
            "long rows": (torch.rand(1, 1, long_n, long_n, generator=gen).to(device, dtype), long_grid),
        }
        q, k = (torch.randn(2, 3, n, d, generator=gen).to(device, dtype) for _ in range(2))
        bias = torch.randn(3, n, n, generator=gen).to(device, dtype)
        mask = (torch.rand(2, 1, 1, n, generator=gen) > 0.3).to(device)
        for renormalize in (False, True):
            for view, view_grid in views.values():
                out = vitmad.mad(view, 16, grid=view_grid, renormalize=renormalize)
                torch.ops.vitmad.mad_backward(torch.ones_like(out), view, 16, grid=view_grid, renormalize=renormalize)
            vitmad.mad(attn, positions=positions, renormalize=renormalize)
            vitmad.mad_qk(q, k, 16, grid=grid, attn_bias=bias, renormalize=renormalize)
            vitmad.mad_qk(q, k, 16, grid=grid, attn_bias=mask, renormalize=renormalize, reduction="none")
            vitmad.mad_qk(q, k, positions=positions, attn_bias=bias, renormalize=renormalize)
            vitmad.mad_qk(q[..., :36], k[..., :36], 16, grid=grid, renormalize=renormalize)
            for view, view_grid in views.values():
                vitmad.attention_stats(view, 16, grid=view_grid, renormalize=renormalize,
                                       stats=("mad", "entropy", "prefix_mass", "self_mass"))
            vitmad.attention_stats(attn, positions=positions, renormalize=renormalize, reduction="none")
            vitmad.attention_stats_qk(q, k, 16, grid=grid, attn_bias=mask, renormalize=renormalize,
                                      stats=("mad", "entropy", "prefix_mass", "self_mass"), reduction="none")
            vitmad.attention_stats_qk(q, k, positions=positions, times=times, attn_bias=bias,
                                      renormalize=renormalize, stats=("mad", "entropy", "temporal_mad"))
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitizer cases done")


class Runner:
    """Runs the steps within the budget and records each one's status in summary.md."""

    def __init__(self, out: Path, budget: float, env: dict[str, str]):
        self.out, self.deadline, self.env, self.rows, self.failed = out, time.monotonic() + budget, env, [], False

    def step(self, name: str, commands: list[list[str]], *, needs: tuple[str, ...] = ()) -> bool:
        missing = [module for module in needs if not module_available(module)]
        if missing:
            return self.record(name, f"skipped: {', '.join(missing)} not installed", 0.0)
        left = self.deadline - time.monotonic()
        if left < 5:
            return self.record(name, "skipped: budget spent", 0.0)
        limit = min(LIMITS[name], left)
        start = time.monotonic()
        with open(self.out / f"{name}.log", "w") as log:
            for command in commands:
                log.write(f"$ {' '.join(command)}\n")
                log.flush()
                try:
                    done = subprocess.run(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                          timeout=max(1.0, limit - (time.monotonic() - start)))
                except subprocess.TimeoutExpired:
                    self.failed = True
                    return self.record(name, f"timed out after {limit:.0f} s", time.monotonic() - start)
                if done.returncode != 0:
                    self.failed = True
                    return self.record(name, f"failed (exit status {done.returncode})", time.monotonic() - start)
        return self.record(name, "ok", time.monotonic() - start)

    def record(self, name: str, status: str, seconds: float) -> bool:
        self.rows.append(f"| {name} | {status} | {seconds:.0f} |")
        print(f"[gpu_check] {name}: {status} ({seconds:.0f} s)", flush=True)
        table = ["| step | status | seconds |", "|---|---|---|", *self.rows]
        (self.out / "summary.md").write_text("\n".join(table) + "\n")
        return status == "ok"


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.sanitizer_cases:
        run_sanitizer_cases()
        return 0
    if args.build_for:
        build(args.build_for, args.out / "build")
        return 0
    gpu = gpu_capability()
    if gpu is None:
        print("gpu_check: no CUDA GPU visible to torch on this machine; arguments checked, nothing run")
        return 0
    name, arch = gpu
    cuda_home = find_cuda_home()
    sanitizer = find_tool("compute-sanitizer", cuda_home)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    import torch

    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": arch, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "VITMAD_REQUIRE_COMPILED": "1", "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
           "VITMAD_CUDA_STATS_KERNELS": "1"}
    if cuda_home is not None:  # torch's extension tooling (torch.compile) must find the real toolkit
        env.setdefault("CUDA_HOME", str(cuda_home))
    (out / "environment.txt").write_text(
        f"GPU {name} (compute capability {arch}); torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"Python {sys.version.split()[0]}; CUDA toolkit {cuda_home}; compute-sanitizer {sanitizer}; "
        f"cmake {cmake_ok()}; {os.cpu_count()} CPUs\n")
    print(f"[gpu_check] {name}, sm {arch}; results in {out}", flush=True)
    runner = Runner(out, args.budget, env)

    python = sys.executable
    this = str(Path(__file__).resolve())
    if args.skip_build:
        runner.record("build", "skipped (--skip-build)", 0.0)
    else:
        runner.step("build", [[python, this, str(out), "--build-for", arch]])
    cuobjdump, library = find_tool("cuobjdump", cuda_home), str(ROOT / "python/vitmad/_vitmad_ops.so")
    if cuobjdump is None:
        runner.record("sass", "skipped: cuobjdump not found", 0.0)
    else:
        runner.step("sass", [[cuobjdump, "--dump-resource-usage", library], [cuobjdump, "--dump-sass", library]])
        # The row kernels' steady-state instructions per element and registers, as RESULTS.md records them.
        runner.step("sass_count", [[python, str(BENCHMARKS / "sass_count.py"), library, "--cuobjdump", cuobjdump]])
    check = [python, "-c", "import vitmad; assert vitmad.backend() == 'compiled', vitmad.backend(); "
             "assert vitmad.has_compiled_kernel('mad_qk', 'CUDA'); "
             "assert vitmad.has_compiled_kernel('stats_qk_pos', 'CUDA'); print('vitmad', vitmad.__file__)"]
    pytest = [python, "-m", "pytest", "tests/ops", "tests/recording/test_record_cuda.py", "-q", "-k", "cuda",
              "-p", "no:cacheprovider"]
    if module_available("xdist"):  # 1,200 cases, most of them a float64 reference on the host: spread them
        # pytest-benchmark, where installed, warns that xdist disables it, and the warning is an error under
        # this project's filterwarnings (a pytest INTERNALERROR on the first H200 run): no test uses it.
        pytest += ["-n", str(min(8, os.cpu_count() or 1)), "-p", "no:benchmark"]
    if module_available("pytest_timeout"):  # a hung kernel fails its test instead of the whole step
        pytest += ["--timeout", "90"]
    runner.step("tests", [check, pytest], needs=("pytest", "hypothesis"))
    # The figures the kernels are judged by come before the sanitizers, which may take what is left of the budget.
    for bench in ("bench_op", "bench_flash", "bench_positions"):
        command = [python, str(BENCHMARKS / f"{bench}.py"), "--device", "cuda"]
        # mad_qk has one kernel for 16-bit input on sm_80+ and another for float32: each dtype its own section.
        dtypes = {"bench_flash": ("bfloat16", "float16", "float32"), "bench_positions": ("float32", "bfloat16")}
        dtypes = dtypes.get(bench, (None,))
        runner.step(bench, [command + (["--dtype", dtype] if dtype else []) for dtype in dtypes])
    cases = [python, this, str(out), "--sanitizer-cases"]
    for tool in ("memcheck", "racecheck"):
        if sanitizer is None:
            runner.record(tool, "skipped: compute-sanitizer not found", 0.0)
        else:
            runner.step(tool, [[sanitizer, f"--tool={tool}", "--error-exitcode=1", *cases]])
    # --skip-memory: the memory half of bench_model measures CPU peak RSS at 1024 px (minutes of eager CPU work).
    runner.step("bench_model", [[python, str(BENCHMARKS / "bench_model.py"), "--device", "cuda", "--skip-memory"]],
                needs=("transformers",))
    # Last, in what is left of the budget: the statistics kernels' time against MAD alone on the GPU.
    for bench in ("bench_stats", "bench_stats_qk"):
        runner.step(bench, [[python, str(BENCHMARKS / f"{bench}.py"), "--device", "cuda"]])
    shutil.copy(BENCHMARKS / "RESULTS.md", out / "RESULTS.md")
    print(f"[gpu_check] done: {out / 'summary.md'}", flush=True)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
