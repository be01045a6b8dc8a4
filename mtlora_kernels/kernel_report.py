"""Compile every kernel of the package for sm_80 and sm_90 without a GPU, and report what the
compilers say: registers, spill bytes, shared memory, tensor-core instructions, compile time,
plus a roofline estimate of each kernel at the benchmark shapes.

Every number comes from a compiler's own output, parsed:

- Triton kernels (``mtlora_kernels.triton.registry.all_kernels()``, every configuration their
  launchers can pick, every dtype): ``triton.compile`` for ``GPUTarget("cuda", cc, 32)`` gives
  the PTX, the cubin and the dynamic shared memory Triton launches with (``metadata.shared``).
  Registers, spill bytes and ptxas' performance warnings: Triton's own ``ptxas -v`` log
  (``TRITON_DUMP_PTXAS_LOG``). Registers again and static shared memory: ``cuobjdump
  -res-usage`` on the cubin (the tests check the two register counts agree).
- CUDA kernels: each ``.cu`` of ``csrc/sources.txt`` that does not include torch headers,
  compiled with ``nvcc -cubin -arch=sm_XX -Xptxas -v`` and the build's flags, read the same way.
- Tensor-core instructions of both: nvdisasm on each kernel's machine code (the cubin's
  ``.text.<kernel>`` section): HMMA on sm_80, HGMMA (wgmma) on sm_90.

Compiled variants: (1) every registry configuration, with pointer arguments marked 16-byte
aligned (what the Triton JIT sees for any tensor PyTorch allocates) and no hint on integer
arguments, i.e. the code that serves every shape; (2) every distinct launch the Triton mix
makes at its ``LAUNCH_SHAPES`` (recorded on meta tensors), specialized as the JIT would: the
shape constexprs those shapes give, integers divisible by 16 marked so, integers equal to 1
made constants. (2) found spills and a serialized wgmma that (1) did not show. No GPU is
needed: the tools ship in the triton wheel (``triton/backends/nvidia/bin``) and in the CUDA
toolkit (``nvcc``).

Compiles run in a pool of fresh (spawned) worker processes with ``TRITON_INTERPRET`` removed from
their environment: under the interpreter ``@triton.jit`` makes functions the compiler cannot
take, and a test session may have set it.  Each worker resolves its kernel by module and name.
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import inspect
import io
import json
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from mtlora_kernels.bench import gpu_peaks

TARGETS = (80, 90)

# Shared memory one block may use, bytes (CUDA C Programming Guide, "Technical Specifications
# per Compute Capability": 163 KB on 8.0, 227 KB on 9.0). A config above it compiles here but
# fails at launch with OutOfResources: the compile tests (tests/test_kernel_report.py) hold
# every registered configuration under it.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}

# Benchmark shapes of SPEC section 3, and the H100 SXM figures the roofline uses (bench's table
# of data-sheet peaks: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16 tensor core).
BENCH_SHAPES = {"T": 8192, "d": 4096, "d_in": 4096, "d_out": 4096, "r": 16, "N": 16, "g": 2,
                "dtype": "bf16", "elem_bytes": 2}
H100_HBM_BYTES_PER_S, H100_BF16_FLOP_PER_S = gpu_peaks("NVIDIA H100 80GB HBM3", "bf16")

TENSOR_CORE_OPS = ("HGMMA", "HMMA", "IGMMA", "IMMA", "QGMMA", "DMMA", "BMMA")
# One SASS line: "/*01a0*/   HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;" (address, op).
_SASS_TC_RE = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?((?:" + "|".join(TENSOR_CORE_OPS)
                         + r")(?:\.[\w.]+)?)\b")

REPO_ROOT = Path(__file__).resolve().parent.parent
CSRC = REPO_ROOT / "csrc"
_TORCH_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*[<"](torch/|ATen/|c10/|pybind11/)', re.M)


@dataclasses.dataclass
class Row:
    """One compiled kernel variant on one target, as the compilers reported it."""

    kernel: str
    config: str
    target: int
    source: str  # "triton" or "cuda"
    uses_dot: bool | None  # None: not declared (CUDA kernels)
    ok: bool
    error: str = ""
    registers: int | None = None  # from the cubin (cuobjdump -res-usage)
    ptxas_registers: int | None = None  # from the ptxas -v log; must equal ``registers``
    spill_stores: int | None = None
    spill_loads: int | None = None
    spill_budget: int = 0  # KernelSpec.spill_budget (0 for CUDA kernels)
    stack_bytes: int | None = None
    shared_dynamic: int | None = None  # bytes Triton requests at launch (metadata.shared)
    shared_static: int | None = None  # bytes the cubin declares (sm_90: + a 1 KB reserve)
    tensor_core: dict[str, int] = dataclasses.field(default_factory=dict)  # SASS op -> count
    ptxas_notes: list[str] = dataclasses.field(default_factory=list)  # e.g. serialized wgmma
    ptxas_log: str = ""  # whose ptxas -v log: "triton", "rerun" (Triton cache hit) or "nvcc"
    compile_s: float | None = None  # CUDA: of the whole .cu file

    @property
    def shared_total(self) -> int | None:
        if self.shared_static is None:
            return None
        return self.shared_static + (self.shared_dynamic or 0)

    def tensor_core_family(self) -> str:
        fams = sorted({op.split(".")[0] for op in self.tensor_core})
        return "/".join(fams) if fams else "none"


# ----------------------------------------------------------------------------- tools and parsers


def nvidia_tool(name: str) -> str:
    """Path of ``ptxas`` / ``cuobjdump`` / ``nvdisasm`` as shipped in the triton wheel."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path} (it ships with the triton wheel)")
    return str(path)


def nvcc_path() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cand = Path(cuda_home) / "bin" / "nvcc"
    return str(cand) if cand.exists() else shutil.which("nvcc")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


_FN_RE = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_SPILL_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_PERF_RE = re.compile(r"(Potential Performance Loss:.*)")


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """Per function: ``registers``, ``stack``, ``spill_stores``, ``spill_loads`` and ``notes``
    (ptxas' performance warnings, e.g. "wgmma.mma_async instructions are serialized") from a
    ``ptxas -v`` log (also the ``-Xptxas -v`` part of nvcc's stderr)."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _FN_RE.search(line):
            current = m.group(1)
            out.setdefault(current, {"notes": []})
        if m := _PERF_RE.search(line):  # names its function at the end of the line
            fn = re.search(r"function '([\w$.]+)'", line)
            key = fn.group(1) if fn else current
            if key is not None:
                out.setdefault(key, {"notes": []})["notes"].append(m.group(1).strip())
            continue
        if current is None:
            continue
        if m := _SPILL_RE.search(line):
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                spill_loads=int(m.group(3)))
        if m := _REGS_RE.search(line):
            out[current]["registers"] = int(m.group(1))
    return out


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """Per function: the ``KEY:value`` pairs of ``cuobjdump -res-usage`` (REG, STACK, SHARED...)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            current = m.group(1)
        elif current is not None and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return out


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` of a cubin, per function."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = _run([nvidia_tool("cuobjdump"), "-res-usage", f.name])
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump -res-usage failed: {r.stderr.strip()}")
    return parse_res_usage(r.stdout)


def elf_text_sections(cubin: bytes) -> dict[str, bytes]:
    """Function name -> its machine code (the ``.text.<name>`` sections of a cubin, ELF64)."""
    if cubin[:5] != b"\x7fELF\x02":
        raise ValueError("not an ELF64 cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
               for i in range(shnum)]
    strtab = headers[shstrndx][4]
    out = {}
    for h in headers:
        name = cubin[strtab + h[0]:cubin.index(b"\0", strtab + h[0])].decode()
        if name.startswith(".text."):
            out[name[len(".text."):]] = cubin[h[4]:h[4] + h[5]]
    return out


def tensor_core_ops(code: list[tuple[int, bytes]]) -> list[Counter]:
    """For each ``(target, machine code of one function)``: a Counter of its tensor-core SASS
    instructions (``HGMMA.64x128x16.F32.BF16`` ...), from nvdisasm.

    nvdisasm spends ~0.3 s of CPU starting up and ~0.03 s per kernel (measured: 50 copies of a
    31 KB GEMM in 2 s), so each target's functions go through ONE call, concatenated into a raw
    instruction stream (SASS instructions are 16 bytes and decode independently); the address
    of each instruction tells which function it belongs to.
    """
    counts = [Counter() for _ in code]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in sorted({t for t, _ in code}):
            idx = [i for i, (t, _) in enumerate(code) if t == target]
            starts, blob = [], bytearray()
            for i in idx:
                starts.append(len(blob))
                blob += code[i][1]
            path = os.path.join(tmp, f"sm{target}.bin")
            Path(path).write_bytes(blob)
            # SM90 decodes the HGMMA of Triton's sm_90a cubins as SM90a does (checked with
            # the triton wheel's nvdisasm 13.1: only the header lines differ).
            procs.append((idx, starts, subprocess.Popen(
                [nvidia_tool("nvdisasm"), "-b", f"SM{target}", path], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)))
        for idx, starts, proc in procs:
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"nvdisasm failed: {err.strip()}")
            for m in _SASS_TC_RE.finditer(out):
                k = bisect.bisect_right(starts, int(m.group(1), 16)) - 1
                counts[idx[k]][m.group(2)] += 1
    return counts


# ----------------------------------------------------------------------------- Triton jobs


@dataclasses.dataclass(frozen=True)
class TritonJob:
    """Everything a worker needs to compile one variant (plain data, so it pickles)."""

    kernel: str
    config: str
    fn_module: str
    fn_qualname: str
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    target: int
    uses_dot: bool
    spill_budget: int = 0
    accepted_notes: tuple[str, ...] = ()  # KernelSpec.accepted_notes
    dtype: str = ""  # what ``{dtype}`` became in the signature
    # A recorded launch's integer arguments as the JIT specializes them: divisible by 16
    # (``tt.divisibility``), or equal to 1 (then a constant, in ``constexprs``).
    divisible_ints: tuple[str, ...] = ()


def _python_function(fn):
    """The Python function under a JITFunction / Autotuner / Heuristics / InterpretedFunction."""
    while not inspect.isfunction(fn):
        if not hasattr(fn, "fn"):
            raise TypeError(f"cannot find the Python function under {fn!r}")
        fn = fn.fn
    return fn


def _jit_function(obj):
    """The JITFunction under an Autotuner / Heuristics wrapper."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        if inspect.isfunction(obj) or not hasattr(obj, "fn"):
            raise TypeError(
                f"{obj!r} is not a @triton.jit kernel here "
                "(was it created with TRITON_INTERPRET=1?)")
        obj = obj.fn
    return obj


def triton_jobs(specs, targets=TARGETS) -> list[TritonJob]:
    """One job per (kernel, dtype, config, target) of ``specs`` (KernelSpec list)."""
    jobs = []
    for spec in specs:
        pyfn = _python_function(spec.fn)
        for dtype in spec.dtypes:
            sig = {k: v.format(dtype=dtype) for k, v in spec.signature.items()}
            for cfg in spec.configs:
                label = cfg.label() if len(spec.dtypes) == 1 else f"{dtype},{cfg.label()}"
                for cc in targets:
                    jobs.append(TritonJob(
                        kernel=spec.name, config=label, fn_module=pyfn.__module__,
                        fn_qualname=pyfn.__qualname__, signature=sig,
                        constexprs=dict(cfg.constexprs), num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, target=cc, uses_dot=spec.uses_dot,
                        spill_budget=spec.spill_budget,
                        accepted_notes=spec.accepted_notes, dtype=dtype))
    return jobs


def launch_jobs(specs, targets=TARGETS) -> list[TritonJob]:
    """One job per distinct recorded launch (kernel, dtype, specialization) of the Triton mix at
    its ``LAUNCH_SHAPES`` and target: the kernels exactly as the launchers launch them there,
    which the registry's configurations (compiled at one specialization each) only stand for.
    Config labels name the first shape that made the launch."""
    import torch

    from mtlora_kernels.triton import mix

    by_fn = {(_python_function(s.fn), d): s for s in specs for d in s.dtypes}
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    jobs, seen = [], set()
    for dname, dtype in dtypes.items():
        for shape_name, shape in mix.LAUNCH_SHAPES.items():
            for kernel, args, meta in mix.recorded_launches(*shape, dtype):
                pyfn = _python_function(kernel)
                spec = by_fn.get((pyfn, dname))
                if spec is None:
                    continue  # a kernel the selected specs do not cover
                params = list(inspect.signature(pyfn).parameters)
                consts = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
                if "UPCAST" in params:
                    consts["UPCAST"] = False  # the interpreter's workaround, never on a GPU
                ints = {name: v for name, v in zip(params, args)
                        if isinstance(v, int) and not isinstance(v, bool)}
                consts.update({name: 1 for name, v in ints.items() if v == 1})
                sig = {k: v.format(dtype=dname) for k, v in spec.signature.items()
                       if k not in consts}
                divisible = tuple(sorted(n for n, v in ints.items() if v != 1 and v % 16 == 0))
                key = (spec.name, dname, json.dumps(consts, sort_keys=True), divisible,
                       meta["num_warps"], meta["num_stages"])
                if key in seen:
                    continue
                seen.add(key)
                label = f"launch:{shape_name}"
                label = label if len(spec.dtypes) == 1 else f"{dname},{label}"
                for cc in targets:
                    jobs.append(TritonJob(
                        kernel=spec.name, config=label, fn_module=pyfn.__module__,
                        fn_qualname=pyfn.__qualname__, signature=sig, constexprs=consts,
                        num_warps=meta["num_warps"], num_stages=meta["num_stages"], target=cc,
                        uses_dot=spec.uses_dot, spill_budget=spec.spill_budget,
                        accepted_notes=spec.accepted_notes, dtype=dname,
                        divisible_ints=divisible))
    return jobs


def _full_signature(fn, signature: dict, constexprs: dict, divisible_ints=()):
    """Signature over every parameter in order (constexprs marked ``"constexpr"``), the constexpr
    values (defaults filled in) and the attributes the JIT gives 16-byte aligned pointers and
    the integers in ``divisible_ints``. A non-constexpr parameter given in ``constexprs`` is a
    specialized constant (the JIT's integer 1)."""
    full, consts, attrs = {}, {}, {}
    names = [p.name for p in fn.params]
    unknown = (set(signature) | set(constexprs) | set(divisible_ints)) - set(names)
    if unknown:
        raise ValueError(f"{fn.__name__}: registry names unknown arguments {sorted(unknown)}")
    for i, p in enumerate(fn.params):
        if not p.is_constexpr and p.name in constexprs:
            consts[p.name] = constexprs[p.name]
            full[p.name] = "constexpr"
        elif p.is_constexpr:
            if p.name in constexprs:
                consts[p.name] = constexprs[p.name]
            elif p.default is not inspect.Parameter.empty:
                consts[p.name] = p.default
            else:
                raise ValueError(f"{fn.__name__}: constexpr {p.name!r} has no value in the config")
            full[p.name] = "constexpr"
        else:
            if p.name not in signature:
                raise ValueError(f"{fn.__name__}: argument {p.name!r} has no type in the signature")
            full[p.name] = signature[p.name]
            if signature[p.name].startswith("*") or p.name in divisible_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return full, consts, attrs


def compile_triton(job: TritonJob) -> tuple[Row, bytes]:
    """Compile one Triton variant; its row (tensor cores still empty) and its machine code.

    The ptxas log is Triton's own: the worker sets ``TRITON_DUMP_PTXAS_LOG=1`` and Triton
    prints it while compiling. When Triton's cache already held the kernel no ptxas ran, and
    the PTX goes through ptxas again with the flags Triton uses.
    """
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(job.kernel, job.config, job.target, "triton", job.uses_dot, ok=False,
              spill_budget=job.spill_budget)
    try:
        obj = importlib.import_module(job.fn_module)
        for part in job.fn_qualname.split("."):
            obj = getattr(obj, part)
        fn = _jit_function(obj)
        sig, consts, attrs = _full_signature(fn, job.signature, job.constexprs,
                                             job.divisible_ints)
        printed = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            kernel = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", job.target, 32),
                options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        row.compile_s = time.perf_counter() - t0
    except Exception as exc:  # the report lists the failure; the tests fail on it
        row.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
        return row, b""
    name = kernel.metadata.name
    row.shared_dynamic = int(kernel.metadata.shared)
    info = parse_ptxas_log(printed.getvalue()).get(name)
    row.ptxas_log = "triton"
    if info is None:
        info, row.ptxas_log = _rerun_ptxas(kernel, job.target).get(name, {}), "rerun"
    usage = resource_usage(kernel.asm["cubin"]).get(name)
    if usage is None or not {"registers", "spill_stores"} <= info.keys():
        row.error = f"no resource report for {name} in cuobjdump/ptxas output"
        return row, b""
    row.registers, row.shared_static = usage["REG"], usage["SHARED"]
    row.ptxas_registers = info["registers"]
    row.spill_stores, row.spill_loads = info["spill_stores"], info["spill_loads"]
    row.stack_bytes = info["stack"]
    row.ptxas_notes = info["notes"]
    row.ok = True
    return row, elf_text_sections(kernel.asm["cubin"])[name]


def _rerun_ptxas(kernel, target: int) -> dict[str, dict]:
    """The ptxas log of a compiled kernel's PTX, with Triton's ptxas flags (its make_cubin)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        Path(ptx).write_text(kernel.asm["ptx"])
        r = _run([nvidia_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
                  f"--gpu-name={sm_arch_from_capability(target)}", ptx, "-o",
                  os.path.join(tmp, "k.cubin")])
    return parse_ptxas_log(r.stderr) if r.returncode == 0 else {}


# ----------------------------------------------------------------------------- CUDA sources


def cuda_sources(csrc: Path = CSRC) -> tuple[list[Path], list[Path]]:
    """``(compilable, skipped)``: the extension's ``.cu`` files (``csrc/sources.txt``, the list the
    build reads; every ``csrc/*.cu`` if it is absent) without / with torch or pybind11 headers."""
    listing = csrc / "sources.txt"
    if listing.is_file():
        lines = [ln.strip() for ln in listing.read_text().splitlines()]
        files = [csrc.parent / ln for ln in lines if ln.endswith(".cu") and not ln.startswith("#")]
    else:
        files = sorted(csrc.glob("*.cu")) if csrc.is_dir() else []
    # A listed file that is missing stays compilable: nvcc's error then says so in the report.
    skipped = [f for f in files
               if f.is_file() and _TORCH_INCLUDE_RE.search(f.read_text(errors="replace"))]
    return [f for f in files if f not in skipped], skipped


def nvcc_flags() -> list[str]:
    """The flags setup.py's CUDAExtension compiles csrc/*.cu with: its own (-O3, -std=c++17,
    -lineinfo) plus the ones torch adds to every extension (no half/bf16 operator overloads,
    relaxed constexpr), which decide what compiles."""
    import logging

    # Without a GPU, importing cpp_extension logs "No CUDA runtime is found": true, and noise here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["-O3", "-std=c++17", "-lineinfo", *COMMON_NVCC_FLAGS]


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short readable name (``forward_kernel<__nv_bfloat16, 16>``: no return type,
    namespaces or parameter list), via binutils' c++filt when it is installed."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    r = subprocess.run([cxxfilt, "-p"], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    if r.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    strip = re.compile(r"^void |\(anonymous namespace\)::|\b\w+::")
    return {n: strip.sub("", d) for n, d in zip(names, out)}


def compile_cuda(path: str, target: int) -> tuple[list[Row], list[bytes]]:
    """Compile one ``.cu`` to a cubin for ``sm_<target>``: a row per kernel in it (tensor
    cores still empty) and each kernel's machine code."""
    nvcc = nvcc_path()
    label = Path(path).name
    if nvcc is None:
        return [Row(label, label, target, "cuda", None, ok=False, error="nvcc not found")], [b""]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "k.cubin")
        t0 = time.perf_counter()
        r = _run([nvcc, "-cubin", f"-arch=sm_{target}", *nvcc_flags(), "-Xptxas", "-v",
                  "-I", str(Path(path).parent), path, "-o", out])
        elapsed = time.perf_counter() - t0
        if r.returncode != 0:
            return [Row(label, label, target, "cuda", None, ok=False,
                        error=f"nvcc failed: {r.stderr.strip()[-2000:]}")], [b""]
        cubin = Path(out).read_bytes()
    res, code, info = resource_usage(cubin), elf_text_sections(cubin), parse_ptxas_log(r.stderr)
    names = _demangle(sorted(res))
    rows = []
    for fn in sorted(res):
        row = Row(names[fn], label, target, "cuda", None, ok=False, registers=res[fn]["REG"],
                  shared_static=res[fn]["SHARED"], compile_s=elapsed, ptxas_log="nvcc")
        i = info.get(fn, {})
        if {"registers", "spill_stores"} <= i.keys():
            row.ok = True
            row.ptxas_registers, row.stack_bytes = i["registers"], i["stack"]
            row.spill_stores, row.spill_loads = i["spill_stores"], i["spill_loads"]
            row.ptxas_notes = i["notes"]
        else:
            row.error = f"no ptxas -v entry for {fn} in nvcc's output"
        rows.append(row)
    return rows, [code.get(fn, b"") for fn in sorted(res)]


# ----------------------------------------------------------------------------- running


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its ptxas -v log; we parse it
    # torch.utils.cpp_extension guesses /usr/local from a PATH nvcc wrapper and warns (SPEC 6).
    nvcc = nvcc_path()
    if nvcc:
        os.environ.setdefault("CUDA_HOME", str(Path(nvcc).resolve().parent.parent))


def _do(job) -> tuple[list[Row], list[bytes]]:
    if isinstance(job, TritonJob):
        row, code = compile_triton(job)
        return [row], [code]
    return compile_cuda(*job)


def run_jobs(jobs: list, workers: int = 0) -> list[Row]:
    """Run compile jobs (TritonJob or ``(cu_path, target)``) on ``workers`` spawned processes
    (0: one per CPU core), then read the tensor-core instructions of every kernel compiled.
    Rows come back in job order."""
    if not jobs:
        return []
    workers = workers or os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    rows, code = [], []
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                initializer=_worker_init) as pool:
        for job_rows, job_code in pool.map(_do, jobs):
            rows += job_rows
            code += job_code
    compiled = [i for i, c in enumerate(code) if c]
    for i, ops in zip(compiled, tensor_core_ops([(rows[i].target, code[i]) for i in compiled])):
        rows[i].tensor_core = dict(ops)
    return rows


def collect(specs=None, targets=TARGETS, workers: int = 0, cuda: bool = True,
            csrc: Path = CSRC) -> dict:
    """Compile everything and return the report as plain data (what ``--json`` prints)."""
    if specs is None:
        from mtlora_kernels.triton.registry import all_kernels

        specs = all_kernels()
    est = estimates(specs)  # before compiling: a broken cost function fails in a second
    compilable, skipped = cuda_sources(csrc) if cuda else ([], [])
    # The .cu files first: one takes up to ~15 s against ~1 s per Triton variant, and starting
    # the longest jobs first keeps every worker busy to the end.
    jobs: list = [(str(f), cc) for f in compilable for cc in targets]
    jobs += triton_jobs(specs, targets) + launch_jobs(specs, targets)
    t0 = time.perf_counter()
    rows = run_jobs(jobs, workers)
    import triton

    return {
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "compiled_without_gpu": True,
        "targets": [f"sm_{t}" for t in targets],
        "wall_s": time.perf_counter() - t0,
        "rows": [dataclasses.asdict(r) | {"shared_total": r.shared_total,
                                          "tensor_core_family": r.tensor_core_family()}
                 for r in rows],
        "cuda_requested": cuda,
        "csrc_found": csrc.is_dir(),
        "cuda_sources": [f.name for f in compilable],
        "cuda_skipped": {f.name: "includes torch/pybind11 headers (binding file)" for f in skipped},
        "estimates": est,
    }


def estimates(specs, shapes=BENCH_SHAPES) -> list[dict]:
    """Per kernel: FLOPs and bytes per launch at ``shapes`` (``KernelSpec.cost``) and the H100
    roofline time they imply, ``max(flops / 989 TFLOP/s, bytes / 3.35 TB/s)``."""
    out = []
    for spec in specs:
        if spec.cost is None:
            out.append({"kernel": spec.name, "flops": None, "bytes": None})
            continue
        flops, nbytes = (float(v) for v in spec.cost(dict(shapes)))
        t_math, t_mem = flops / H100_BF16_FLOP_PER_S, nbytes / H100_HBM_BYTES_PER_S
        out.append({"kernel": spec.name, "flops": flops, "bytes": nbytes,
                    "intensity": flops / nbytes if nbytes else None,
                    "bound": "compute" if t_math > t_mem else "memory",
                    "roofline_us": max(t_math, t_mem) * 1e6})
    return out


# ----------------------------------------------------------------------------- printing

COLUMNS = ("kernel", "config", "target", "regs", "spill st/ld B", "smem B", "tensor-core SASS",
           "compile s")
EST_COLUMNS = ("kernel", "GFLOP", "MB moved", "FLOP/B", "bound", "roofline us")


def _cells(r: dict) -> list[str]:
    head = [r["kernel"], r["config"], f"sm_{r['target']}"]
    if not r["ok"]:
        return head + ["FAILED", "", "", (r["error"].splitlines() or [""])[0][:100], ""]
    tc = ", ".join(f"{k} x{v}" for k, v in sorted(r["tensor_core"].items())) or "none"
    if r["ptxas_notes"]:
        tc += " (ptxas: see notes)"
    spill = f"{r['spill_stores']}/{r['spill_loads']}"
    if r["spill_stores"] > r["spill_budget"]:
        spill += f" > budget {r['spill_budget']}"
    return head + [str(r["registers"]), spill,
                   str(r["shared_total"]), tc,
                   "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"]


def _est_cells(e: dict) -> list[str]:
    if e["flops"] is None:
        return [e["kernel"]] + ["n/a"] * 5
    return [e["kernel"], f"{e['flops'] / 1e9:.2f}", f"{e['bytes'] / 1e6:.1f}",
            "-" if e["intensity"] is None else f"{e['intensity']:.1f}", e["bound"],
            f"{e['roofline_us']:.1f}"]


SUMMARY_COLUMNS = ("kernel", "target", "variants", "failed", "regs", "max spill st B",
                   "over budget", "max smem B", "tensor cores (variants)", "compile s")


def _group_compile_s(rows: list[dict]) -> float:
    # The rows of one .cu file all carry that file's compile time: count it once.
    if rows[0]["source"] == "cuda":
        return rows[0]["compile_s"] or 0.0
    return sum(r["compile_s"] or 0.0 for r in rows)


def _summary_rows(report: dict) -> list[tuple[bool, list[str]]]:
    """Per kernel (Triton) or .cu file (CUDA) and target: ``(needs attention, cells)``."""
    groups: dict[tuple, list[dict]] = {}
    for r in report["rows"]:
        key = r["kernel"] if r["source"] == "triton" else r["config"]
        groups.setdefault((key, r["target"]), []).append(r)
    out = []
    for (key, target), rows in groups.items():
        ok = [r for r in rows if r["ok"]]
        over = sum(r["spill_stores"] > r["spill_budget"] for r in ok)
        fams = Counter(r["tensor_core_family"] for r in ok)
        regs = sorted(r["registers"] for r in ok)
        cells = [key, f"sm_{target}", str(len(rows)), str(len(rows) - len(ok)),
                 f"{regs[0]}-{regs[-1]}" if regs else "-",
                 str(max((r["spill_stores"] for r in ok), default=0)), str(over),
                 str(max((r["shared_total"] for r in ok), default=0)),
                 ", ".join(f"{f} x{n}" for f, n in sorted(fams.items())) or "-",
                 f"{_group_compile_s(rows):.1f}"]
        out.append((len(ok) < len(rows) or over > 0, cells))
    return out


def _titles(report: dict) -> tuple[str, str]:
    s = BENCH_SHAPES
    return (f"Kernels compiled for {', '.join(report['targets'])} without a GPU "
            f"(triton {report['triton']}, {report['date']})",
            f"Roofline per launch at T={s['T']}, d={s['d']}, r={s['r']}, N={s['N']}, g={s['g']}, "
            f"{s['dtype']} on an H100 ({H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s, "
            f"{H100_BF16_FLOP_PER_S / 1e12:.0f} TFLOP/s bf16)")


def _notes(report: dict) -> list[str]:
    notes = []
    if not report["rows"]:
        notes.append("No kernels registered or found.")
    if not report["cuda_requested"]:
        notes.append("CUDA: not compiled (--no-cuda).")
    elif not report["csrc_found"]:
        notes.append("CUDA: csrc/ not found (an installed package without its sources).")
    elif not report["cuda_sources"]:
        skipped = ", ".join(report["cuda_skipped"]) or "none"
        notes.append("CUDA: no csrc .cu file without torch headers to compile "
                     f"(skipped: {skipped}).")
    else:
        notes.append("CUDA rows: compile s is that of the whole .cu file.")
        if report["cuda_skipped"]:
            notes.append(f"CUDA: {', '.join(report['cuda_skipped'])} not compiled (torch headers).")
    for r in report["rows"]:
        for note in r["ptxas_notes"]:
            notes.append(f"ptxas, {r['kernel']} [{r['config']}] sm_{r['target']}: {note}")
    notes.append(f"{len(report['rows'])} variants compiled in {report['wall_s']:.1f} s.")
    return notes


def print_report(report: dict, console=None) -> None:
    """Every variant, the per-kernel summary and the roofline, as rich tables."""
    from rich.console import Console
    from rich.table import Table

    def table(title, columns, rows, left=("kernel", "config", "target", "bound")):
        t = Table(title=title)
        for col in columns:
            t.add_column(col, justify="left" if col in left or "tensor" in col else "right")
        for cells in rows:
            t.add_row(*cells)
        return t

    # rich wraps at 80 columns when writing to a pipe or file; the variant table needs ~200
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    title, est_title = _titles(report)
    variants = []
    for r in report["rows"]:
        cells = _cells(r)
        if not r["ok"]:
            cells[3] = "[red]FAILED[/red]"
        elif r["spill_stores"]:
            color = "red" if r["spill_stores"] > r["spill_budget"] else "yellow"
            cells[4] = f"[{color}]{cells[4]}[/{color}]"
        variants.append(cells)
    console.print(table(title, COLUMNS, variants))
    summary = [[f"[red]{c}[/red]" for c in cells] if bad else cells
               for bad, cells in _summary_rows(report)]
    console.print(table("Summary per kernel and target", SUMMARY_COLUMNS, summary))
    console.print(table(est_title, EST_COLUMNS, [_est_cells(e) for e in report["estimates"]]))
    for note in _notes(report):
        console.print(note)


def markdown(report: dict) -> str:
    """The summary and roofline tables as GitHub Markdown, every variant in a folded table
    (for python/tools/KERNELS.md)."""
    def table(cols, rows):
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)

    title, est_title = _titles(report)
    parts = [f"**{title}: summary per kernel and target**", "",
             table(SUMMARY_COLUMNS, [cells for _, cells in _summary_rows(report)]), "",
             f"**{est_title}**", "",
             table(EST_COLUMNS, [_est_cells(e) for e in report["estimates"]]), "",
             *[f"- {n}" for n in _notes(report)], "",
             f"<details><summary>Every variant ({len(report['rows'])})</summary>", "",
             table(COLUMNS, [_cells(r) for r in report["rows"]]), "", "</details>"]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the report's flags to ``parser`` (``mtlora-kernels kernels``; :func:`run` reads them)."""
    from mtlora_kernels.cli import _positive

    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the report as JSON")
    out.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--target", type=int, action="append", choices=TARGETS,
                        help="compute capability to compile for (repeatable; default: 80 and 90)")
    parser.add_argument("--kernel", action="append",
                        help="only Triton kernels whose name contains this (repeatable)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the csrc/*.cu kernels")
    parser.add_argument("--jobs", type=_positive,
                        help="compile processes (default: one per CPU core)")


def run(args: argparse.Namespace) -> int:
    """Build and print the report; exit status 1 when a variant failed to compile or spills
    past its kernel's budget (the summary rows marked red)."""
    from mtlora_kernels.triton.registry import all_kernels

    specs = all_kernels()
    if args.kernel:
        specs = [s for s in specs if any(k in s.name for k in args.kernel)]
        if not specs:
            names = ", ".join(sorted(s.name for s in all_kernels()))
            print(f"kernels: no Triton kernel name contains {' or '.join(args.kernel)}; "
                  f"they are: {names}", file=sys.stderr)
            return 2
    report = collect(specs, targets=tuple(args.target or TARGETS), workers=args.jobs or 0,
                     cuda=not args.no_cuda)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.markdown:
        sys.stdout.write(markdown(report))
    else:
        print_report(report)
    return 1 if any(bad for bad, _ in _summary_rows(report)) else 0

