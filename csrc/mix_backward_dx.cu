// Backward, the input gradient: dx = keep / (1 - p) * (dh . A) + dz . W_route.
// NOT verified on hardware; see mtlora.h.
#include "common.cuh"
#include "mtlora.h"

namespace mtlora {
namespace {

// Piece k (0, 1, 2) of an fp32 value split into three 16-bit ones, v = p0 + p1 / S + p2 / S^2
// with S = lo_scale<T>() (1 for bf16, 2^11 for fp16): p0 = v rounded to T, p1 = what that
// lost, times S, rounded, p2 = what p1 lost, times S. Each difference is exact in fp32, and
// the three pieces carry all 24 bits of v's significand (bf16: 8 + 8 + 8; fp16: 11 + 11 + 11,
// S lifting the lower pieces of small values out of fp16's subnormal range). As a loader
// transform it returns the fp32 value whose rounding to T (by the loader's store) is the piece.
template <typename T>
struct SplitPiece {
  int k;
  __device__ __forceinline__ float operator()(int64_t, int64_t, float v) const {
    for (int i = 0; i < k; ++i) v = rounding_residual<T>(v);
    return v;
  }
};

// Block (bx, by) writes dx[t0:t0+64, i0:i0+64]. The two GEMMs (K = r, then K = g*N) cannot
// share one accumulator because only the first is masked by dropout, so the first goes through
// Cs into per-thread registers (8 consecutive columns each: one 16 B store at the end).
// The router GEMM dz . W_route needs dz's full fp32 bits: dz sums to 0 over a group's experts,
// so the part of W_route a group's rows share cancels in this product only while dz keeps
// them (rounded to fp16 / bf16 first, dx was off by 22% / 100% with router logits of ~1e4;
// tests/test_extreme.py). For 16-bit inputs W_route is exact in T, so it runs on the tensor
// cores as three GEMMs of dz's SplitPiece pieces against W into one fp32 accumulator, scaled
// by S between them (exact powers of two): ((p0 . W) S + p1 . W) S + p2 . W, then / S^2, as
// Triton's kernel uses 3xTF32. Three keep all of dz's bits, as the FMA tiles did before, for
// one more K = g*N pass per tile than two (16 bits in bf16, 22 in fp16): with two, bf16 dx was
// 0.13 off (tolerance 3e-2) where a group's router rows share large columns (emulated;
// tests/test_extreme.py, test_router_offset_shared_by_a_group_cancels_in_dx). fp32 inputs
// take dz as it is (one piece), on the FMA tiles.
// Launch bounds (kThreads, 2), as the dy kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    backward_dx_kernel(const float* __restrict__ dh, const float* __restrict__ dz,
                       const T* __restrict__ A, const T* __restrict__ W, T* __restrict__ dx,
                       MixShape s, float p, uint64_t seed, bool vec_dh, bool vec_dz,
                       bool vec_dx) {
  // The tile layout with the split operand's second As (16-bit: 32.0 KB; fp32: 33.5 KB).
  __shared__ __align__(128) unsigned char smem_raw_[TileSmem<T, 64>::kSplitBytes];
  const TileBuffers<T> tb = tile_buffers<T, 64>(smem_raw_);
  T* As = tb.As;
  T* Bs = tb.Bs;
  float* Cs = tb.Cs;
  T* As_lo = tb.As_lo;  // fp32 dh split in two 16-bit halves (split_store), like dA's
  constexpr int CHUNKS = 64 * (BN / 8) / kThreads;  // 4
  const int64_t t0 = int64_t(blockIdx.x) * 64;
  const int64_t i0 = int64_t(blockIdx.y) * BN;
  const int64_t d_in = s.d_in;
  const int64_t gn = s.g * s.N;
  const Dropout drop(p, seed, d_in);

  TileMma<T, 64> acc;
  acc.zero();
  auto dhs = rows_loader<64>(As, dh, s.r, t0, s.T, s.r, vec_dh, Identity{}, As_lo);  // dh[t][k]
  auto as = cols_loader<BN>(Bs, A, d_in, s.r, i0, d_in, Identity{});  // Bs[i][k] = A[k][i]
  gemm_over_k(acc, dhs, as, 0, s.r);
  acc.store(Cs);
  __syncthreads();
  float own[CHUNKS][8];
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    int rr, cc;
    own_chunk(i, rr, cc);
#pragma unroll
    for (int u = 0; u < 8; ++u) own[i][u] = drop(t0 + rr, i0 + cc + u, Cs[rr * LDC + cc + u]);
  }
  if (W != nullptr) {
    constexpr int kPieces = sizeof(T) == 2 ? 3 : 1;  // fp32: dz itself, on the FMA tiles
    static_assert(kPieces <= 3, "the unscaling below");
    constexpr float S = lo_scale<T>();
    acc.zero();
    for (int k = 0; k < kPieces; ++k) {
      if constexpr (S != 1.f) {
        if (k > 0) acc.scale(S);
      }
      auto dzs = rows_loader<64>(As, dz, gn, t0, s.T, gn, vec_dz, SplitPiece<T>{k});
      auto ws = cols_loader<BN>(Bs, W, d_in, gn, i0, d_in, Identity{});  // Bs[i][n] = W[n][i]
      gemm_over_k(acc, dzs, ws, 0, gn);
    }
    if constexpr (S != 1.f) acc.scale(1.f / (kPieces == 3 ? S * S : S));
    acc.store(Cs);  // after gemm_over_k's barriers: every thread is done reading Cs above
    __syncthreads();
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      int rr, cc;
      own_chunk(i, rr, cc);
#pragma unroll
      for (int u = 0; u < 8; ++u) own[i][u] += Cs[rr * LDC + cc + u];
    }
  }
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    int rr, cc;
    own_chunk(i, rr, cc);
    const int64_t t = t0 + rr, col = i0 + cc;
    if (t >= s.T) continue;
    T* out = dx + t * d_in + col;
    if (vec_dx && col + 8 <= d_in) {
      store_vec8(out, own[i]);
    } else {
      for (int u = 0; u < 8 && col + u < d_in; ++u) out[u] = from_f<T>(own[i][u]);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_backward_dx(const float* dh, const float* dz, const T* A, const T* W, T* dx,
                               const MixShape& s, float p, uint64_t seed, cudaStream_t stream) {
  const dim3 grid(ceil_div(s.T, 64), ceil_div(s.d_in, BN));
  backward_dx_kernel<T><<<grid, kThreads, 0, stream>>>(
      dh, W != nullptr ? dz : nullptr, A, W, dx, s, p, seed, vec_ok(dh, s.r, sizeof(float)),
      vec_ok(dz, s.g * s.N, sizeof(float)), vec_ok(dx, s.d_in, sizeof(T)));
  return cudaGetLastError();
}

#define MTLORA_INSTANTIATE_DX(T)                                                        \
  template cudaError_t launch_backward_dx<T>(const float*, const float*, const T*, const T*, \
                                             T*, const MixShape&, float, uint64_t,       \
                                             cudaStream_t);
MTLORA_INSTANTIATE_DX(float)
MTLORA_INSTANTIATE_DX(__half)
MTLORA_INSTANTIATE_DX(__nv_bfloat16)

}  // namespace mtlora
