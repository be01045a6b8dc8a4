"""The CUDA extension's kernels under sanitizers, on the CPU (tests/cuda_emu).

``check.cpp`` runs the launch sequences of ``csrc/mix.cpp`` over shapes that reach every kernel
path (odd and aligned sizes, the folded and per-expert mix, decode tiles, two rank chunks, the
split and deterministic dy kernel, external logits, plain LoRA) in fp32, fp16 and bf16:

- under AddressSanitizer + UndefinedBehaviorSanitizer: any read or write past a tensor, a
  static shared-memory array or the dynamic shared memory, and any 16-byte vector access at a
  misaligned address;
- under ThreadSanitizer: any pair of threads of a block touching the same shared or global
  memory without a barrier or atomic between them (what compute-sanitizer's racecheck looks
  for), and of two blocks of a launch that run at once (up to four: emu.h's concurrent_blocks)
  touching the same global memory.

Each was shown to catch an injected bug (RELIABILITY.md): a dropped barrier in the
K-loop (TSan), a tile loader reading one row past the end (ASan), vector loads without the
alignment test (UBSan). Correctness against the reference is tests/test_cuda_mix.py's job.

The drivers allocate their own buffers; the tensors bindings.cpp allocates (outputs and
workspaces sized by its plans) are checked by running emulated cases of test_cuda_mix.py in a
Python with the extension module built under ASan + UBSan (``lib-asan``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import cuda_emu

pytestmark = pytest.mark.emulator


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_kernels_clean_under_sanitizer(variant):
    exe = cuda_emu.build(variant)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1",
                              "ASAN_OPTIONS": "detect_leaks=1"})
    report = res.stdout[-3000:] + res.stderr[-6000:]
    assert res.returncode == 0, f"{variant} run failed (rc {res.returncode}):\n{report}"
    assert "Sanitizer" not in res.stderr and "runtime error" not in res.stderr, report
    assert res.stdout.count(": ok") == 45, res.stdout  # 15 shapes x 3 dtypes, all ran


def test_bindings_allocations_under_address_sanitizer():
    """The emulated cases whose tensors bindings.cpp sizes by its plans (column and token
    splits' workspaces, clusters, external logits) and its refusals, in a Python that
    preloads libasan (and libstdc++, without which ASan cannot intercept the C++ exceptions
    of torch's checks) with the module built under ASan + UBSan: torch's CPU tensors then
    come from ASan's allocator, so a kernel touching memory past any tensor bindings.cpp
    allocated (a workspace too small, an output of the wrong shape) aborts the run. Shown on
    an injected bug: the forward's workspace one float short passes every test of the plain
    module and is a heap-buffer-overflow in forward_kernel here."""
    cuda_emu.build("lib-asan")  # here, so a compile error fails with its message
    preload = " ".join(subprocess.run([cuda_emu.CXX, f"-print-file-name={name}"],
                                      capture_output=True, text=True, check=True).stdout.strip()
                       for name in ("libasan.so", "libstdc++.so"))
    env = {**os.environ, "LD_PRELOAD": preload, "ASAN_OPTIONS": "detect_leaks=0",
           cuda_emu.VARIANT_ENV: "lib-asan"}
    # -s: an ASan report goes to the process's stderr, which pytest's capture would lose when
    # ASan aborts the process. fp32 only ("float16" also matches bfloat16): bindings.cpp sizes
    # its tensors in elements, whatever the dtype, and this keeps the run near 80 s.
    res = subprocess.run(
        [sys.executable, "-m", "pytest", str(cuda_emu.ROOT / "tests" / "test_cuda_mix.py"),
         "-q", "-s", "-p", "no:cacheprovider", "-m", "emulator", "-k",
         "(boundary or splits or clusters or external_logits) and not float16"],
        capture_output=True, text=True, timeout=900, env=env, cwd=cuda_emu.ROOT)
    found = [i for i in (res.stderr.find("ERROR: AddressSanitizer"),
                         res.stderr.find("runtime error")) if i >= 0]
    start = min(found, default=max(0, len(res.stderr) - 6000))  # the sanitizer's report
    report = res.stdout[-3000:] + res.stderr[start:start + 6000]
    assert res.returncode == 0, f"the run under ASan failed (rc {res.returncode}):\n{report}"
    assert re.search(r"\b\d+ passed", res.stdout) and "skipped" not in res.stdout, report


_SHARED_PROBE = """
#include <cstdio>
#include <cuda_runtime_api.h>
__device__ unsigned char* piece(int v) {  // one static array, executed twice per block
  __shared__ __align__(16) unsigned char buf[64];
  if (threadIdx.x == 0 && v >= 0) buf[0] = static_cast<unsigned char>(v);
  __syncthreads();
  return buf;
}
__global__ void probe(int* out) {
  unsigned char* a = piece(int(blockIdx.x));
  unsigned char* b = piece(-1);
  __shared__ unsigned char other[32];
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = (a == b) + 2 * (b[0] == blockIdx.x) + 4 * (other != a);
}
int main() {
  int out[8] = {};
  ::emu::concurrent_blocks = 4;
  probe<<<8, 32, 0, nullptr>>>(out);
  for (int i = 0; i < 8; ++i) std::printf("%d ", out[i]);
  return 0;
}
"""


def test_static_shared_array_is_one_per_declaration_and_block(tmp_path):
    """A __shared__ declaration executed twice in a block (in a function called twice) is the
    same array, which keeps what the block wrote, as on a GPU; another declaration is another
    array; blocks that run at once (concurrent_blocks) each have their own."""
    src = tmp_path / "probe.cpp"
    src.write_text(cuda_emu.rewrite(_SHARED_PROBE))
    exe = tmp_path / "probe"
    subprocess.run([cuda_emu.CXX, *cuda_emu.BASE_FLAGS, "-O1", "-I", str(cuda_emu.HERE / "include"),
                    str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True)
    assert res.stdout.split() == ["7"] * 8, res.stdout


_RACE_PROBE = """
#include <cstdio>
#include <cstring>
#include <cuda_runtime_api.h>
__global__ void fill(int* g) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  g[i] += i + 1;
}
// Each thread stages the next element of `in` in shared memory and writes its neighbour's.
__global__ void shift(const int* in, int* out, int n, bool sync) {
  __shared__ __align__(16) unsigned char raw[1024 * sizeof(int)];
  int* s = reinterpret_cast<int*>(raw);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = in[(i + 1) % n];
  if (sync) __syncthreads();
  out[i] = s[(threadIdx.x + 1) % blockDim.x];
}
// Thread 0 of each block writes its block's element and reads the next block's.
__global__ void neighbour(int* g) {
  if (threadIdx.x == 0) g[blockIdx.x] = 1 + g[(blockIdx.x + 1) % gridDim.x];
}
static int a[2048], b[2048], wa[2048], wb[2048];
static void host_shift(const int* in, int* out, int bs) {  // what shift computes
  for (int i = 0; i < 2048; ++i) out[i] = in[(i / bs * bs + (i % bs + 1) % bs + 1) % 2048];
}
int main(int, char** argv) {
  ::emu::concurrent_blocks = 4;
  if (std::strcmp(argv[1], "blocks") == 0) {
    neighbour<<<8, 32, 0, nullptr>>>(a);
    return 0;
  }
  const bool sync = std::strcmp(argv[1], "shared") != 0;
  for (int round = 0; round < 3; ++round) {  // the same threads run again: no order leaks
    fill<<<8, 256, 0, nullptr>>>(a);
    shift<<<8, 256, 0, nullptr>>>(a, b, 2048, sync);
    shift<<<64, 32, 0, nullptr>>>(b, a, 2048, sync);
    shift<<<2, 1024, 0, nullptr>>>(a, b, 2048, sync);
    for (int i = 0; i < 2048; ++i) wa[i] += i + 1;
    host_shift(wa, wb, 256);
    host_shift(wb, wa, 32);
    host_shift(wa, wb, 1024);
  }
  int bad = 0;
  for (int i = 0; i < 2048; ++i) bad += b[i] != wb[i];
  std::printf("%d wrong\\n", bad);
  return 0;
}
"""


def test_thread_sanitizer_sees_races_of_threads_and_blocks_and_nothing_else(tmp_path):
    """The emulator's threads are pooled across launches; to ThreadSanitizer they must stay
    unordered within a launch and ordered between launches. A probe run under TSan: threads of
    a block passing values through shared memory race without the barrier ("shared"), blocks
    that run at once race on global memory ("blocks"), and with the barrier, launch after launch
    on reused threads of 32 to 1024 per block, the run is clean and right ("clean")."""
    src = tmp_path / "race.cpp"
    src.write_text(cuda_emu.rewrite(_RACE_PROBE))
    exe = tmp_path / "race"
    subprocess.run([cuda_emu.CXX, *cuda_emu.BASE_FLAGS, *cuda_emu.VARIANTS["tsan"], "-I",
                    str(cuda_emu.HERE / "include"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1"}
    runs = {mode: subprocess.run([str(exe), mode], capture_output=True, text=True, timeout=300,
                                 env=env) for mode in ("clean", "shared", "blocks")}
    clean = runs.pop("clean")
    assert clean.returncode == 0 and "Sanitizer" not in clean.stderr, clean.stderr[-6000:]
    assert clean.stdout.split() == ["0", "wrong"], clean.stdout
    for mode, res in runs.items():
        assert res.returncode != 0 and "ThreadSanitizer: data race" in res.stderr, (
            f"{mode}: no race reported (rc {res.returncode})\n{res.stderr[-3000:]}")


def test_rewrite_turns_cuda_syntax_into_cpp():
    src = """
  __shared__ __align__(128) unsigned char smem_raw_[TileSmem<T, BM>::kBytes];
  extern __shared__ __align__(128) unsigned char dyn_[];  // Smem::kBytes
  k<T, BM><<<grid, kThreads, smem, stream>>>(
      a, f(b, c), d);
  const cudaError_t e = cudaLaunchKernelEx(
      &cfg, fk<T, BM, kCluster>, a.x, s);
  cudaLaunchKernelEx(&cfg, ns::gk<T>, b);
"""
    out = cuda_emu.rewrite(src)
    assert ("unsigned char* smem_raw_ = ::emu::static_shared(TileSmem<T, BM>::kBytes, "
            "__COUNTER__);" in out)
    assert "unsigned char* dyn_ = ::emu::dynamic_shared();  // Smem::kBytes" in out
    assert ("::emu::launch(grid, kThreads, smem, stream, reinterpret_cast<const void*>(&k<T, BM>),"
            " [&] { k<T, BM>(\n      a, f(b, c), d); }, 1u, \"k\");" in out)
    assert ('const cudaError_t e = ::emu::launch_kernel_ex("fk", \n      &cfg, fk<T, BM, kCluster>,'
            ' a.x, s);') in out
    assert '::emu::launch_kernel_ex("gk", &cfg, ns::gk<T>, b);' in out
    assert "<<<" not in out and "__shared__" not in out
    for bad in ("extern __shared__ float buf[];", "__shared__ float buf[64];",
                "__shared__ __align__(256) unsigned char buf[64];"):
        with pytest.raises(ValueError, match="must be unsigned char, aligned to <= 128 B"):
            cuda_emu.rewrite(bad)
