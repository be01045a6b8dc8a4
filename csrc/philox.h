// Counter-based dropout RNG shared by the host (bindings.cpp, compiled by g++) and the device
// (the .cu files): Philox4x32-10 (Salmon et al., SC'11), with the conventions of Triton's
// tl.rand(seed, offset) so that a mask can be checked against an independent implementation:
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (offset & 0xffffffff, offset >> 32, 0, 0),  offset = t * d_in + k  (int64)
//   uniform = float(w < 0 ? ~w : w) * 4.6566127342e-10f,  w = first output word as int32
//   keep    = uniform >= p   (kept values are scaled by 1 / (1 - p))
// We carry our own Philox instead of curand_kernel.h because the CUDA toolkit on the dev/CI
// machines ships without cuRAND headers, and because a host twin makes the mask testable
// without a GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MTLORA_HD __host__ __device__ __forceinline__
#else
#define MTLORA_HD inline
#endif

namespace mtlora {

MTLORA_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First 32-bit word of Philox4x32-10(counter = (c0, c1, 0, 0), key = (k0, k1)).
MTLORA_HD uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

MTLORA_HD float dropout_uniform(uint64_t seed, int64_t offset) {
  const uint64_t o = static_cast<uint64_t>(offset);
  const uint32_t w = philox_first_word(static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32),
                                       static_cast<uint32_t>(seed),
                                       static_cast<uint32_t>(seed >> 32));
  int32_t s = static_cast<int32_t>(w);
  s = s < 0 ? ~s : s;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__int2float_rn(s), 4.6566127342e-10f);
#else
  return static_cast<float>(s) * 4.6566127342e-10f;
#endif
}

// keep = uniform >= p for element (t, k) of a [T, d_in] input.
MTLORA_HD bool dropout_keep(uint64_t seed, int64_t t, int64_t k, int64_t d_in, float p) {
  return dropout_uniform(seed, t * d_in + k) >= p;
}

}  // namespace mtlora
