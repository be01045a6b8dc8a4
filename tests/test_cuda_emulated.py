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
"""

from __future__ import annotations

import os
import subprocess

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
    assert res.stdout.count(": ok") == 39, res.stdout  # 13 shapes x 3 dtypes, all ran


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
