// Backward, the weight gradients: dB, and dA / dW_route in one launch.
// Both are GEMMs that reduce over the tokens (K = T) inside one block, in a fixed order: no
// atomics, deterministic in every mode. NOT verified on hardware; see mtlora.h.
//
// Launch bounds (kThreads, 4): these run the longest K loops (all T tokens) and are
// memory-bound, so they keep four blocks per SM: ptxas (CUDA 13.0) fits them in 122-128
// registers with no spills. Without a minimum it took 132-167 for some variants and held
// backward_db_kernel<__half> to 96 with a 22 B spill (sm_80).
#include "common.cuh"
#include "mtlora.h"

namespace mtlora {
namespace {

// Block (bx, e, bz) writes dB[e, j0:j0+64, rc0:rc0+64] = s * sum_t (dy * pi_e)[t, j] h[t, k],
// staging both operands transposed (tokens along K).
template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    backward_db_kernel(const T* __restrict__ dy, const float* __restrict__ h,
                       const float* __restrict__ pi, T* __restrict__ dB, MixShape s,
                       float scaling) {
  MTLORA_TILE_SMEM(T, 64);
  const int64_t j0 = int64_t(blockIdx.x) * 64;
  const int64_t e = blockIdx.y;
  const int64_t rc0 = int64_t(blockIdx.z) * BN;
  const int64_t c = s.d_out / s.g;
  auto dy_pi = [=](int64_t t, int64_t j, float v) { return v * pi[(t * s.g + j / c) * s.N + e]; };

  TileMma<T, 64> acc;
  acc.zero();
  auto dys = cols_loader<64>(As, dy, s.d_out, s.T, j0, s.d_out, dy_pi);  // As[j][t]
  auto hs = cols_loader<BN>(Bs, h, s.r, s.T, rc0, s.r, Identity{});      // Bs[k][t]
  gemm_over_k(acc, dys, hs, 0, s.T);
  acc.store(Cs);
  __syncthreads();
  for (int q = threadIdx.x; q < 64 * BN; q += kThreads) {
    const int rr = q / BN, cc = q % BN;
    const int64_t j = j0 + rr, k = rc0 + cc;
    if (j < s.d_out && k < s.r) dB[(e * s.d_out + j) * s.r + k] = from_f<T>(scaling * Cs[rr * LDC + cc]);
  }
}

// Block (bx, by) writes a 64 x 64 tile of dA = dh^T . drop(x) (by < tiles_a) or of
// dW = dz^T . x (the rest); the dropout mask is regenerated from the seed while x is staged.
// For 16-bit x the fp32 dh / dz enter the tensor cores split in two halves (split_store), so
// the reduction over the tokens sees them to about 16 bits instead of 8 (bf16).
template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    backward_daw_kernel(const T* __restrict__ x, const float* __restrict__ dh,
                        const float* __restrict__ dz, T* __restrict__ dA, T* __restrict__ dW,
                        MixShape s, int tiles_a, float p, uint64_t seed) {
  __shared__ __align__(128) unsigned char smem_raw_[TileSmem<T, 64>::kSplitBytes];
  const TileBuffers<T> tb = tile_buffers<T, 64>(smem_raw_);
  T* As = tb.As;
  T* Bs = tb.Bs;
  float* Cs = tb.Cs;
  T* As_lo = tb.As_lo;
  const int64_t i0 = int64_t(blockIdx.x) * BN;
  const bool is_a = int(blockIdx.y) < tiles_a;
  const int64_t n0 = int64_t(is_a ? blockIdx.y : blockIdx.y - tiles_a) * 64;
  const float* D = is_a ? dh : dz;
  const int64_t nrows = is_a ? s.r : s.g * s.N;
  T* out = is_a ? dA : dW;
  const int64_t d_in = s.d_in;
  const Dropout x_op(is_a ? p : 0.f, seed, d_in);

  TileMma<T, 64> acc;
  acc.zero();
  auto ds = cols_loader<64>(As, D, nrows, s.T, n0, nrows, Identity{}, As_lo);  // As[n][t]
  auto xs = cols_loader<BN>(Bs, x, d_in, s.T, i0, d_in, x_op);                // Bs[i][t]
  gemm_over_k(acc, ds, xs, 0, s.T);
  acc.store(Cs);
  __syncthreads();
  for (int q = threadIdx.x; q < 64 * BN; q += kThreads) {
    const int rr = q / BN, cc = q % BN;
    const int64_t n = n0 + rr, i = i0 + cc;
    if (n < nrows && i < d_in) out[n * d_in + i] = from_f<T>(Cs[rr * LDC + cc]);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_backward_dB(const T* dy, const float* h, const float* pi, T* dB,
                               const MixShape& s, float scaling, cudaStream_t stream) {
  const dim3 grid(ceil_div(s.d_out, 64), static_cast<unsigned>(s.N), ceil_div(s.r, BN));
  backward_db_kernel<T><<<grid, kThreads, 0, stream>>>(dy, h, pi, dB, s, scaling);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_dAW(const T* x, const float* dh, const float* dz, T* dA, T* dW,
                                const MixShape& s, float p, uint64_t seed, cudaStream_t stream) {
  const int tiles_a = int(ceil_div(s.r, 64));
  const int tiles_w = dz != nullptr ? int(ceil_div(s.g * s.N, 64)) : 0;
  const dim3 grid(ceil_div(s.d_in, BN), tiles_a + tiles_w);
  backward_daw_kernel<T><<<grid, kThreads, 0, stream>>>(x, dh, dz, dA, dW, s, tiles_a, p, seed);
  return cudaGetLastError();
}

#define MTLORA_INSTANTIATE_W(T)                                                                \
  template cudaError_t launch_backward_dB<T>(const T*, const float*, const float*, T*,         \
                                             const MixShape&, float, cudaStream_t);            \
  template cudaError_t launch_backward_dAW<T>(const T*, const float*, const float*, T*, T*,    \
                                              const MixShape&, float, uint64_t, cudaStream_t);
MTLORA_INSTANTIATE_W(float)
MTLORA_INSTANTIATE_W(__half)
MTLORA_INSTANTIATE_W(__nv_bfloat16)

}  // namespace mtlora
