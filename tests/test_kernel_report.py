"""The kernel report: every kernel of the package compiles for sm_80 and sm_90 (no GPU needed),
GEMM kernels reach the tensor cores, nothing spills beyond its kernel's spill_budget (0 but the
fp32 forward's 252 B); and the report's parsers read real
compiler output correctly (tiny kernels defined here, compiled for real)."""

from __future__ import annotations

import ast
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import triton
import triton.language as tl
from rich.console import Console

from mtlora_kernels import kernel_report as kr
from mtlora_kernels import cli
from mtlora_kernels.triton import registry
from mtlora_kernels.triton.registry import KernelConfig, KernelSpec

# ----------------------------------------------------------------------------- tiny known kernels


@triton.jit
def _tiny_gemm(a_ptr, b_ptr, c_ptr, K, stride_a, stride_b, stride_c,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * stride_a + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * stride_b + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_c + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _tiny_scale(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * scale, mask=mask)


@triton.jit
def _tiny_gemm_print(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
        tl.device_print("k", k)  # a call inside the wgmma pipeline: ptxas serializes it
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


_GEMM_SIG = {"a_ptr": "*{dtype}", "b_ptr": "*{dtype}", "c_ptr": "*{dtype}", "K": "i32",
             "stride_a": "i32", "stride_b": "i32", "stride_c": "i32"}
# 64x64x32 with 4 warps: one warpgroup, so sm_90 takes the wgmma (HGMMA) path.
_SMALL = KernelConfig({"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=2)
# The tile of SPEC section 6 that spilled (128x128x64, 4 warps: 255 registers + spills).
_SPILLS = KernelConfig({"BM": 128, "BN": 128, "BK": 64}, num_warps=4, num_stages=3)
# K = 8: the interpreter accepts it, the compiler must not (dot operands need dims >= 16).
_K8 = KernelConfig({"BM": 16, "BN": 16, "BK": 8}, num_warps=4, num_stages=2)

GEMM = KernelSpec("tiny_gemm", _tiny_gemm, _GEMM_SIG, (_SMALL, _SPILLS, _K8),
                  dtypes=("bf16", "fp16"), uses_dot=True,
                  cost=lambda s: (2.0 * s["T"] * s["d"] * s["r"],
                                  2.0 * s["elem_bytes"] * s["T"] * s["d"]))
SCALE = KernelSpec("tiny_scale", _tiny_scale,
                   {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "scale": "fp32"},
                   (KernelConfig({"BLOCK": 1024}, num_warps=4, num_stages=1),), dtypes=("fp32",),
                   uses_dot=False)
SERIAL = KernelSpec("tiny_gemm_print", _tiny_gemm_print,
                    {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32"},
                    (KernelConfig({"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=3),))


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    """An empty Triton cache for the tiny kernels: they compile for real, so the ptxas log is
    the one Triton prints (a cache hit takes the rerun path, tested separately). Workers are
    spawned with the environment of the moment: set it around each run only."""
    return {"TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton_cache"))}


@pytest.fixture(scope="module")
def tiny_report(triton_cache):
    """The report over a temporary registry holding only the tiny kernels (the package's
    registry is restored before compiling, so the tests below still see the real kernels)."""
    registry.all_kernels()  # import every kernel module now, so none registers into ours
    saved = dict(registry.KERNELS)
    registry.KERNELS.clear()
    try:
        registry.register(GEMM)
        registry.register(SCALE)
        registry.register(SERIAL)
        specs = registry.all_kernels()
    finally:
        registry.KERNELS.clear()
        registry.KERNELS.update(saved)
    assert [s.name for s in specs] == ["tiny_gemm", "tiny_scale", "tiny_gemm_print"]
    with mock.patch.dict(os.environ, triton_cache):
        report = kr.collect(specs, cuda=False)
    assert {r["ptxas_log"] for r in report["rows"] if r["ok"]} == {"triton"}
    return report


def _row(report, kernel, config_part, target):
    rows = [r for r in report["rows"]
            if r["kernel"] == kernel and config_part in r["config"] and r["target"] == target]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("target", kr.TARGETS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_parsers_on_a_compiled_gemm(tiny_report, dtype, target):
    r = _row(tiny_report, "tiny_gemm", f"{dtype},BK=32,BM=64,BN=64", target)
    assert r["ok"], r["error"]
    assert 0 < r["registers"] <= 255
    # Two independent readings of the same binary: ptxas -v on Triton's PTX and the cubin.
    assert r["ptxas_registers"] == r["registers"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0
    assert r["shared_dynamic"] > 0  # the tl.dot operands are staged through shared memory
    assert r["shared_total"] == r["shared_static"] + r["shared_dynamic"]
    # Triton declares no static shared memory; for sm_90 ptxas adds a 1 KB reserved block to a
    # kernel that uses shared memory, and the cubin counts it (.nv.shared.reserved.0).
    assert r["shared_static"] == {80: 0, 90: 1024}[target]
    family = {80: "HMMA", 90: "HGMMA"}[target]
    assert r["tensor_core_family"] == family
    ops = r["tensor_core"]
    assert all(op.startswith(family + ".") for op in ops) and sum(ops.values()) > 0
    # The operand type is in the mnemonic: HMMA.16816.F32.BF16 vs HMMA.16816.F32 (fp16).
    assert all(op.endswith(".BF16") == (dtype == "bf16") for op in ops), ops
    assert r["compile_s"] > 0


@pytest.mark.parametrize("target", kr.TARGETS)
def test_parsers_on_a_compiled_elementwise_kernel(tiny_report, target):
    r = _row(tiny_report, "tiny_scale", "BLOCK=1024", target)
    assert r["ok"], r["error"]
    assert 0 < r["registers"] == r["ptxas_registers"]
    assert r["tensor_core"] == {} and r["tensor_core_family"] == "none"
    assert r["spill_stores"] == 0 and r["ptxas_notes"] == []
    assert r["shared_total"] == r["shared_static"] == 0  # no shared memory: no reserved block


def test_serialized_wgmma_is_reported(tiny_report):
    r90 = _row(tiny_report, "tiny_gemm_print", "BK=32", 90)
    assert r90["ok"] and r90["tensor_core_family"] == "HGMMA"
    assert any("wgmma" in n and "serialized" in n for n in r90["ptxas_notes"]), r90["ptxas_notes"]
    assert "serialized" in kr.markdown(tiny_report)
    r80 = _row(tiny_report, "tiny_gemm_print", "BK=32", 80)  # no wgmma on sm_80
    assert r80["ok"] and r80["tensor_core_family"] == "HMMA" and r80["ptxas_notes"] == []


def test_triton_cache_hit_reads_the_same_numbers(tiny_report, triton_cache):
    """Second compile of the same variants: Triton's cache answers and prints no ptxas log, so
    the PTX goes through ptxas again; every number must match the first (uncached) compile."""
    jobs = [j for j in kr.triton_jobs([GEMM]) if "BK=8," not in j.config]
    with mock.patch.dict(os.environ, triton_cache):
        again = kr.run_jobs(jobs)
    assert {r.ptxas_log for r in again} == {"rerun"}
    keys = ("registers", "ptxas_registers", "spill_stores", "spill_loads", "stack_bytes",
            "shared_dynamic", "shared_static", "tensor_core", "ptxas_notes")
    for r in again:
        first = _row(tiny_report, r.kernel, r.config, r.target)
        assert {k: getattr(r, k) for k in keys} == {k: first[k] for k in keys}, r.config


_WMMA_CU = r"""
#include <mma.h>
#include <cuda_bf16.h>
using namespace nvcuda;

__global__ void tile_gemm(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

__global__ void scale(const float* x, float* y, float s, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = s * x[i];
}
"""


def test_cuda_path_and_batched_disassembly_on_a_known_file(tmp_path):
    """A .cu with a WMMA kernel and an elementwise one: the report's rows, and its batched
    nvdisasm count against cuobjdump -sass of the same cubin, function by function."""
    import subprocess

    if kr.nvcc_path() is None:
        pytest.skip("nvcc not found (CUDA_HOME / PATH)")
    cu = tmp_path / "known.cu"
    cu.write_text(_WMMA_CU)
    rows, code = kr.compile_cuda(str(cu), 80)
    got = dict(zip([r.kernel for r in rows], kr.tensor_core_ops([(80, c) for c in code])))
    assert sorted(got) == ["scale", "tile_gemm"], sorted(got)
    assert all(r.ok and r.registers > 0 and r.registers == r.ptxas_registers for r in rows)
    assert all(r.spill_stores == 0 and r.ptxas_log == "nvcc" for r in rows)
    assert not got["scale"] and sum(got["tile_gemm"].values()) > 0
    assert all(op.startswith("HMMA.") and op.endswith(".BF16") for op in got["tile_gemm"])

    cubin = tmp_path / "known.cubin"
    subprocess.run([kr.nvcc_path(), "-cubin", "-arch=sm_80", *kr.nvcc_flags(), str(cu), "-o",
                    str(cubin)], check=True, capture_output=True)
    sass = subprocess.run([kr.nvidia_tool("cuobjdump"), "-sass", str(cubin)], check=True,
                          capture_output=True, text=True).stdout
    per_fn = {}
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split()[0]
        per_fn[name] = Counter(re.findall(r"\b(HMMA(?:\.[\w.]+)?)", chunk))
    mangled = {k for k in per_fn if "tile_gemm" in k}
    assert len(mangled) == 1 and per_fn[mangled.pop()] == got["tile_gemm"]
    assert not any(per_fn[k] for k in per_fn if "scale" in k)


@pytest.mark.parametrize("target", kr.TARGETS)
def test_spills_are_read(tiny_report, target):
    r = _row(tiny_report, "tiny_gemm", "bf16,BK=64,BM=128,BN=128", target)
    assert r["ok"], r["error"]
    assert r["spill_stores"] > 0 and r["spill_loads"] > 0
    assert r["stack_bytes"] >= r["spill_loads"]
    assert f"{r['spill_stores']}/{r['spill_loads']} > budget 0" in kr.markdown(tiny_report)
    within = _row(tiny_report, "tiny_gemm", "bf16,BK=32,BM=64,BN=64", target)  # no spills
    assert kr._cells(within)[4] == "0/0"


@pytest.mark.parametrize("target", kr.TARGETS)
def test_a_config_that_does_not_compile_is_reported(tiny_report, target):
    r = _row(tiny_report, "tiny_gemm", "bf16,BK=8,BM=16,BN=16", target)
    assert not r["ok"] and r["error"] and r["registers"] is None


def test_roofline_estimate_and_output_formats(tiny_report, capsys):
    est = {e["kernel"]: e for e in tiny_report["estimates"]}
    assert est["tiny_scale"]["flops"] is None  # no cost callable: reported as n/a
    g = est["tiny_gemm"]
    s = kr.BENCH_SHAPES
    assert g["flops"] == 2.0 * s["T"] * s["d"] * s["r"]
    assert g["roofline_us"] == pytest.approx(1e6 * max(
        g["flops"] / kr.H100_BF16_FLOP_PER_S, g["bytes"] / kr.H100_HBM_BYTES_PER_S))
    assert g["bound"] == "memory"

    json.loads(json.dumps(tiny_report))  # --json prints exactly this
    md = kr.markdown(tiny_report)
    variants = md.count("\n| tiny_gemm | bf16,") + md.count("\n| tiny_gemm | fp16,")
    assert variants == 2 * 3 * len(kr.TARGETS) and "n/a" in md
    kr.print_report(tiny_report, Console(file=sys.stdout, width=250))
    out = capsys.readouterr().out
    assert "FAILED" in out and "HGMMA" in out and "n/a" in out and "Summary" in out
    # Summary: tiny_gemm on sm_90 has 6 variants (2 dtypes x 3 configs), 2 failing (K = 8).
    assert re.search(r"\| tiny_gemm \| sm_90 \| 6 \| 2 \| \d+-\d+ \| [1-9]\d* \| 2 \|", md)
    assert "CUDA: not compiled (--no-cuda)." in md  # collected with cuda=False


def test_registry_mistakes_are_reported_clearly():
    bad = {
        "'scale' has no type": ({"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 8}),
        "constexpr 'BLOCK' has no value": (SCALE.signature, {}),
        "unknown arguments": (SCALE.signature | {"bogus": "i32"}, {"BLOCK": 8}),
    }
    jobs = [kr.TritonJob("tiny_scale", msg, __name__, "_tiny_scale", sig, consts, 4, 1, 90, False)
            for msg, (sig, consts) in bad.items()]
    for job, row in zip(jobs, kr.run_jobs(jobs, workers=1)):
        assert not row.ok and job.config in row.error, row.error


# A ptxas -v log in the format nvcc 13.0 prints: two kernels and a __noinline__ device function,
# whose properties come after its caller's; a performance warning that names its function. The
# numbers are edited to be distinct, so that no field can stand in for another.
_PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5smallPf' for 'sm_90'
ptxas info    : Function properties for _Z5smallPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
ptxas info    : Compile time = 13.995 ms
ptxas info    : Compiling entry function '_Z3bigPKfPfi' for 'sm_90'
ptxas info    : Function properties for _Z3bigPKfPfi
    480 bytes stack frame, 216 bytes spill stores, 248 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 496 bytes cumulative stack size
ptxas info    : Compile time = 132.984 ms
ptxas info    : Function properties for _Z6helperPKfi
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized \
due to the presence of Extern calls in the function '_Z5smallPf'
"""


def test_ptxas_log_is_read_per_function():
    assert kr.parse_ptxas_log(_PTXAS_LOG) == {
        "_Z5smallPf": {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 10,
                       "notes": ["Potential Performance Loss: wgmma.mma_async instructions are "
                                 "serialized due to the presence of Extern calls in the "
                                 "function '_Z5smallPf'"]},
        "_Z3bigPKfPfi": {"stack": 480, "spill_stores": 216, "spill_loads": 248,
                         "registers": 24, "notes": []},
        "_Z6helperPKfi": {"stack": 16, "spill_stores": 8, "spill_loads": 4, "notes": []},
    }


def test_predicated_tensor_core_instructions_are_counted():
    sass = """\
        /*0370*/                   HMMA.16816.F32.BF16 R4, R4, R8, RZ ;
        /*0380*/               @P0 HMMA.16816.F32 R12, R16, R20, R12 ;
        /*0390*/              @!UP1 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*03a0*/                   HFMA2.MMA R2, -RZ, RZ, 0, 0 ;
        /*03b0*/              @!P2 BRA 0x3c0 ;
"""
    assert [m.groups() for m in kr._SASS_TC_RE.finditer(sass)] == [
        ("0370", "HMMA.16816.F32.BF16"), ("0380", "HMMA.16816.F32"),
        ("0390", "HGMMA.64x64x16.F32.BF16")]


_SM80_ONLY_CU = r"""
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 800
#error compiled for the wrong target
#endif
__global__ void stage(float* y) {
  __shared__ float t[256];
  t[threadIdx.x] = y[threadIdx.x];
  __syncthreads();
  y[threadIdx.x] = t[255 - threadIdx.x];
}
"""


def test_cuda_path_compiles_for_the_target_asked(tmp_path):
    """A .cu that only compiles for sm_80: it does for 80 (static shared memory read from the
    cubin: 256 floats), and for 90 the row says nvcc failed and why."""
    if kr.nvcc_path() is None:
        pytest.skip("nvcc not found (CUDA_HOME / PATH)")
    cu = tmp_path / "sm80.cu"
    cu.write_text(_SM80_ONLY_CU)
    (r80,), _ = kr.compile_cuda(str(cu), 80)
    assert r80.ok and r80.kernel == "stage" and r80.shared_static == 256 * 4 == r80.shared_total
    (r90,), (code90,) = kr.compile_cuda(str(cu), 90)
    assert not r90.ok and code90 == b"" and "wrong target" in r90.error


def test_cli_kernels_exit_status_is_1_when_a_variant_fails(tiny_report, capsys):
    """The exit status follows the rows: 1 with the K = 8 configs failing or the 128x128x64
    tile spilling past its budget (0), 0 without them."""
    args = cli.build_parser().parse_args(["kernels", "--no-cuda", "--markdown"])
    ok = [r for r in tiny_report["rows"] if r["ok"]]
    spills = [r for r in ok if r["spill_stores"] > r["spill_budget"]]
    assert spills and len(ok) < len(tiny_report["rows"])
    clean = [r for r in ok if r not in spills]
    for rows, status in ((tiny_report["rows"], 1), (ok, 1), (clean, 0)):
        report = dict(tiny_report, rows=rows)
        with mock.patch.object(kr, "collect", return_value=report):
            assert kr.run(args) == status
    capsys.readouterr()


def _cubin_reads_one_more_register():
    """Worker initializer: cuobjdump's register counts one too high, the ptxas log untouched."""
    kr._worker_init()
    real = kr.resource_usage
    kr.resource_usage = lambda cubin: {f: u | {"REG": u["REG"] + 1} for f, u in real(cubin).items()}


def test_the_two_register_readings_are_independent(triton_cache):
    """``registers`` comes from the cubin and ``ptxas_registers`` from the ptxas log, so the
    compile tests' check that they agree can fail."""
    (job,) = kr.triton_jobs([SCALE], (90,))
    with mock.patch.dict(os.environ, triton_cache):
        # The worker imports this module before its initializer runs: not under the interpreter.
        os.environ.pop("TRITON_INTERPRET", None)
        with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_cubin_reads_one_more_register) as pool:
            row, _ = pool.submit(kr.compile_triton, job).result()
    assert row.ok and row.registers == row.ptxas_registers + 1 > 1


def test_full_signature_marks_pointers_and_divisible_integers():
    """What the JIT would see: every pointer and each integer in ``divisible_ints`` 16-divisible,
    an integer given in ``constexprs`` a constant, constexpr defaults filled in."""
    from triton.runtime.jit import JITFunction

    fn = JITFunction(kr._python_function(_tiny_gemm))
    sig = {k: v.format(dtype="bf16") for k, v in _GEMM_SIG.items() if k != "stride_c"}
    full, consts, attrs = kr._full_signature(fn, sig, {"BM": 64, "BN": 32, "BK": 16,
                                                       "stride_c": 1}, ("stride_a",))
    assert list(full.values()) == ["*bf16"] * 3 + ["i32"] * 3 + ["constexpr"] * 4
    assert consts == {"stride_c": 1, "BM": 64, "BN": 32, "BK": 16}
    assert attrs == {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 4)}


def test_cuda_sources_are_the_listed_cu_files_without_torch_headers(tmp_path):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "k.cu").write_text("__global__ void k() {}\n")
    (csrc / "b.cu").write_text("#include <torch/extension.h>\n")
    (csrc / "sources.txt").write_text(
        "# once: csrc/old.cu\ncsrc/bindings.cpp\ncsrc/k.cu\ncsrc/b.cu\ncsrc/missing.cu\n")
    assert kr.cuda_sources(csrc) == ([csrc / "k.cu", csrc / "missing.cu"], [csrc / "b.cu"])


# ----------------------------------------------------------------------------- the real kernels


def test_recorded_launches_are_specialized_as_the_jit_would():
    """Launch jobs carry the launch's shape constexprs and the JIT's integer specializations
    (divisible by 16 -> a hint, equal to 1 -> a constant); never the interpreter's UPCAST."""
    jobs = {(j.kernel, j.config): j for j in kr.launch_jobs(registry.all_kernels(), (90,))}
    bench = jobs["mix_fwd", "bf16,launch:bench"]  # T = 8192, d = 4096, N = 16, g = 2
    assert {"T", "d_in", "d_out", "c", "N", "r"} <= set(bench.divisible_ints)
    assert "g" not in bench.divisible_ints and bench.constexprs["UPCAST"] is False
    assert bench.constexprs["N_PAD"] == 16 and bench.constexprs["GB"] == 2
    fine = jobs["mix_fwd", "bf16,launch:fine-grained"]  # g = d_out: c = 1
    assert fine.constexprs["c"] == 1 and "c" not in fine.signature
    odd = jobs["mix_bwd_dh", "bf16,launch:odd"]  # d = 1000, r = 12, N = 3, g = 5
    assert not {"d_out", "c", "r", "N"} & set(odd.divisible_ints)
    assert not odd.constexprs["ALIGNED"]
    assert {j.dtype for j in jobs.values()} == {"bf16", "fp16", "fp32"}


_SPECS = registry.all_kernels()
_PRIMARY = {spec.name: spec.dtypes[0] for spec in _SPECS}
_JOBS = kr.triton_jobs(_SPECS) + kr.launch_jobs(_SPECS)  # configurations, then real launches
_CUDA_JOBS = [(f, cc) for f in kr.cuda_sources()[0] for cc in kr.TARGETS]


@pytest.fixture(scope="module")
def package_rows(request):
    """The rows of exactly the variants and .cu files the selected tests below check, compiled
    in one pool (so ``-k mix_fwd`` compiles mix_fwd only)."""
    selected = [item.callspec.params for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    cuda = sorted({(str(p["cu"]), p["target"]) for p in selected if "cu" in p})
    return kr.run_jobs(cuda + [p["job"] for p in selected if "job" in p])


# Compile time is ~0.8 s of CPU per variant on a fast 2-core machine and ~2 s on a slow one
# (2026-12-07: 462 variants took 523 s of wall time). CI compiles every configuration of every
# kernel for sm_90 (the Hopper path: wgmma and its serialization notes) in each kernel's first
# (primary) dtype, half of that; sm_80 and the other dtypes run with the slow tests (pytest -m
# slow) and in `mtlora-kernels kernels`.
def _in_ci(job) -> bool:
    return job.dtype == _PRIMARY[job.kernel] and job.target == 90


@pytest.mark.parametrize("job", [
    pytest.param(j, marks=() if _in_ci(j) else pytest.mark.slow,
                 id=f"{j.kernel}-{j.config}-sm_{j.target}") for j in _JOBS])
def test_triton_kernel_config_compiles_without_spills(package_rows, job):
    (r,) = [r for r in package_rows if (r.kernel, r.config, r.target) ==
            (job.kernel, job.config, job.target)]
    where = f"{job.kernel} [{job.config}] on sm_{job.target}"
    assert r.ok, f"{where} does not compile: {r.error}"
    assert r.registers == r.ptxas_registers
    # KernelSpec.spill_budget: 0 unless the kernel's notes justify more.
    assert r.spill_stores <= job.spill_budget, (
        f"{where} spills {r.spill_stores} B (budget {job.spill_budget} B)")
    assert r.shared_total <= kr.MAX_SHARED[job.target], (
        f"{where} needs {r.shared_total} B of shared memory, the GPU has "
        f"{kr.MAX_SHARED[job.target]}")
    if job.uses_dot:
        assert r.tensor_core, f"{where} carries a tl.dot but has no tensor-core instruction"
        # A serialized wgmma pipeline still counts as HGMMA but loses its overlap; a kernel
        # may accept a note only with the reason in its KernelSpec.notes.
        unexplained = [n for n in r.ptxas_notes if not any(a in n for a in job.accepted_notes)]
        assert not unexplained, f"{where}: {unexplained}"


@pytest.mark.parametrize("cu,target", _CUDA_JOBS, ids=[f"{f.name}-sm_{t}" for f, t in _CUDA_JOBS])
def test_cuda_kernels_compile_without_spills(package_rows, cu, target):
    rows = [r for r in package_rows if r.source == "cuda" and r.config == cu.name
            and r.target == target]
    assert rows, f"{cu.name}: no report rows for sm_{target}"
    for r in rows:
        assert r.ok, f"{cu.name} does not compile for sm_{target}: {r.error}"
        assert r.registers == r.ptxas_registers
        assert r.spill_stores == 0, (
            f"{r.kernel} ({cu.name}) spills {r.spill_stores} B on sm_{target}")


def test_cli_kernels_subcommand(monkeypatch, capsys):
    registry.all_kernels()
    monkeypatch.setattr(registry, "KERNELS", {SCALE.name: SCALE})
    assert cli.main(["kernels", "--json", "--no-cuda", "--target", "90", "--jobs", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["rows"]
    assert row["kernel"] == "tiny_scale" and row["target"] == 90 and row["ok"]
    assert row["registers"] > 0 and row["tensor_core_family"] == "none"
    # A --kernel filter that matches nothing is an error, not an empty report.
    assert cli.main(["kernels", "--no-cuda", "--kernel", "tiny_scael"]) == 2
    assert "no Triton kernel name contains tiny_scael; they are: tiny_scale" in \
        capsys.readouterr().err


def test_nvcc_flags_are_the_builds():
    """The report compiles csrc/ with the flags setup.py gives nvcc (read from its source: the
    build needs a CUDA toolkit), so its registers and spills are the built extension's."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
    given = [ast.literal_eval(node.values[node.keys.index(key)])
             for node in ast.walk(tree) if isinstance(node, ast.Dict)
             for key in node.keys if isinstance(key, ast.Constant) and key.value == "nvcc"]
    assert len(given) == 1, "setup.py should pass nvcc flags in one place"
    assert kr.nvcc_flags()[:len(given[0])] == given[0]
    assert any(f.startswith("-std=") for f in given[0]), "torch would pick the C++ standard"


def test_triton_jobs_are_every_config_in_every_dtype_for_every_target():
    """One job per (dtype, configuration, target), its pointer types in that dtype, labelled by
    the configuration (the dtype first where a kernel has several); no two share a label."""
    assert [(j.config, j.target, j.signature["x_ptr"]) for j in kr.triton_jobs([SCALE])] == [
        ("BLOCK=1024,w4,s1", 80, "*fp32"), ("BLOCK=1024,w4,s1", 90, "*fp32")]
    got = {(j.config, j.target, j.signature["a_ptr"]) for j in kr.triton_jobs([GEMM])}
    assert got == {(f"{d},{c}", t, f"*{d}") for d in ("bf16", "fp16") for t in (80, 90)
                   for c in ("BK=32,BM=64,BN=64,w4,s2", "BK=64,BM=128,BN=128,w4,s3",
                             "BK=8,BM=16,BN=16,w4,s2")}
    assert len({(j.kernel, j.config, j.target) for j in _JOBS}) == len(_JOBS)


def test_collect_compiles_the_cu_files_configs_and_launches_for_every_target():
    specs = [s for s in _SPECS if s.name == "mix_bwd_db"]
    with mock.patch.object(kr, "run_jobs", return_value=[]) as run_jobs:
        report = kr.collect(specs)
    (jobs, _), _ = run_jobs.call_args
    cu = [(str(f), t) for f in kr.cuda_sources()[0] for t in (80, 90)]
    assert cu and jobs == cu + kr.triton_jobs(specs) + kr.launch_jobs(specs)
    assert any("launch:" in j.config for j in jobs[len(cu):])
    assert report["targets"] == ["sm_80", "sm_90"]


def test_all_kernels_imports_every_kernel_module(monkeypatch):
    """Kernel modules nobody has imported yet register their kernels too."""
    import mtlora_kernels.triton as pkg

    monkeypatch.setattr(registry, "KERNELS", {})
    for name in ("mix", "rsvd"):
        monkeypatch.delitem(sys.modules, f"{pkg.__name__}.{name}")
        monkeypatch.delattr(pkg, name)
    modules = {kr._python_function(s.fn).__module__ for s in registry.all_kernels()}
    assert modules == {"mtlora_kernels.triton.mix", "mtlora_kernels.triton.rsvd"}
