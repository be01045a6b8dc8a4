// Backward, the dy side: dh and dpi (one kernel, one pass over dy), then the softmax backward.
// NOT verified on hardware (emulated on the CPU only); see mtlora.h.
#include <algorithm>

#include "common.cuh"
#include "mtlora.h"

namespace mtlora {
namespace {

// Block (bx, by, bz) owns tokens [t0, t0 + 64), the output columns [jbeg, jend) of split by,
// and the rank chunk [rc0, rc0 + 64) of dh (bz > 0 only when r > 64). Per 64-column chunk
// and expert e it
//   1. recomputes ye = h . B_e^T for the chunk (K = r; block z == 0 only, N > 1 only) and adds
//      s * sum_{j in G, in chunk} dy[t, j] ye[t, j] to dpi[t, G, e] (SPEC: dpi = s h . u);
//   2. accumulates dh += (dy * pi_e) . B_e over the chunk (K = 64 columns), where
//      (dy * pi_e)[t, j] = dy[t, j] pi[t, G(j), e] is formed while staging dy.
// dy is read from L2 once per expert rather than cached: an extra 64 x 64 tile would push the
// fp32 variant past 48 KB of static shared memory.
// With one split (gridDim.y == 1) every dh / dpi element has exactly one writer -- this block
// -- and partial sums over chunks are read-modify-written in order (deterministic, no
// atomics). With several splits they are combined with fp32 atomicAdd.
//
// Launch bounds (kThreads, 2): without a minimum, ptxas (CUDA 13.0) gave the fp16 variant 168
// registers and an 8 B spill on sm_80; with two blocks per SM it takes 213-228, no spills.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    backward_dy_kernel(const T* __restrict__ dy, const float* __restrict__ h,
                       const float* __restrict__ pi, const T* __restrict__ B, float* dh,
                       float* dpi, MixShape s, float scaling, int64_t split_cols, bool vec_dy,
                       bool vec_h, bool vec_b) {
  MTLORA_TILE_SMEM(T, 64);
  const int64_t t0 = int64_t(blockIdx.x) * 64;
  const int64_t jbeg = int64_t(blockIdx.y) * split_cols;
  const int64_t jend = min(jbeg + split_cols, s.d_out);
  const int64_t rc0 = int64_t(blockIdx.z) * BN;
  const bool single_writer = gridDim.y == 1;
  const bool need_dpi = s.N > 1 && blockIdx.z == 0;
  const int64_t c = s.d_out / s.g;

  TileMma<T, 64> dh_acc;
  TileMma<T, 64> ye;
  dh_acc.zero();
  for (int64_t j0 = jbeg; j0 < jend; j0 += BN) {
    const int64_t j_hi = min(j0 + BN, jend);
    for (int64_t e = 0; e < s.N; ++e) {
      const T* Be = B + e * s.d_out * s.r;
      if (need_dpi) {
        ye.zero();
        auto hs = rows_loader<64>(As, h, s.r, t0, s.T, s.r, vec_h, Identity{});
        auto bs = rows_loader<BN>(Bs, Be, s.r, j0, j_hi, s.r, vec_b, Identity{});
        gemm_over_k(ye, hs, bs, 0, s.r);
        ye.store(Cs);
        __syncthreads();
        // (token, group) pairs of this chunk: a group may start before j0 or end after j_hi.
        const int64_t g_first = j0 / c;
        const int ng = int((j_hi - 1) / c - g_first + 1);
        for (int q = threadIdx.x; q < 64 * ng; q += kThreads) {
          const int rr = q / ng;
          const int64_t G = g_first + q % ng;
          const int64_t t = t0 + rr;
          if (t >= s.T) continue;
          const int64_t lo = max(G * c, j0), hi = min(G * c + c, j_hi);
          float sum = 0.f;
          for (int64_t j = lo; j < hi; ++j) sum += to_f(dy[t * s.d_out + j]) * Cs[rr * LDC + (j - j0)];
          float* dst = dpi + (t * s.g + G) * s.N + e;
          if (single_writer) {
            *dst += scaling * sum;
          } else {
            atomicAdd(dst, scaling * sum);
          }
        }
        // Cs is written next after the barriers of the loop below: no barrier needed here.
      }
      auto dy_pi = [=](int64_t t, int64_t j, float v) { return v * pi[(t * s.g + j / c) * s.N + e]; };
      auto dys = rows_loader<64>(As, dy, s.d_out, t0, s.T, j_hi, vec_dy, dy_pi);
      auto bs = cols_loader<BN>(Bs, Be, s.r, j_hi, rc0, s.r, Identity{});  // B_e[j][rc0 + k]
      gemm_over_k(dh_acc, dys, bs, j0, j_hi);
    }
  }
  dh_acc.store(Cs);
  __syncthreads();
  for (int q = threadIdx.x; q < 64 * BN; q += kThreads) {
    const int rr = q / BN, cc = q % BN;
    const int64_t t = t0 + rr, k = rc0 + cc;
    if (t >= s.T || k >= s.r) continue;
    const float v = scaling * Cs[rr * LDC + cc];
    if (single_writer) {
      dh[t * s.r + k] = v;
    } else {
      atomicAdd(dh + t * s.r + k, v);
    }
  }
}

// One thread per (token, group): dz = pi * (dp - sum_e pi * dp), dp = dpi + dpi_extra.
__global__ void softmax_backward_kernel(const float* pi, const float* dpi, const float* dpi_extra,
                                        float* dz, int64_t rows, int64_t N) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t base = row * N;
  float dot = 0.f;
  for (int64_t e = 0; e < N; ++e) {
    const float dp = dpi[base + e] + (dpi_extra != nullptr ? dpi_extra[base + e] : 0.f);
    dot += pi[base + e] * dp;
  }
  for (int64_t e = 0; e < N; ++e) {
    const float dp = dpi[base + e] + (dpi_extra != nullptr ? dpi_extra[base + e] : 0.f);
    dz[base + e] = pi[base + e] * (dp - dot);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_backward_dy(const T* dy, const float* h, const float* pi, const T* B, float* dh,
                               float* dpi, const MixShape& s, float scaling, bool deterministic,
                               int num_sms, cudaStream_t stream) {
  const int64_t tiles_t = ceil_div(s.T, 64);
  const int64_t tiles_r = ceil_div(s.r, BN);
  const int64_t col_tiles = ceil_div(s.d_out, BN);
  // Split the columns only when the token tiles alone leave SMs idle (about 2 blocks per SM
  // wanted); a split costs fp32 atomics, so deterministic mode never splits.
  int64_t splits = 1;
  if (!deterministic) {
    const int64_t want = (2 * int64_t(num_sms) + tiles_t * tiles_r - 1) / (tiles_t * tiles_r);
    splits = std::max<int64_t>(1, std::min(want, col_tiles));
  }
  const int64_t split_cols = (col_tiles + splits - 1) / splits * BN;
  splits = (s.d_out + split_cols - 1) / split_cols;
  const dim3 grid(static_cast<unsigned>(tiles_t), static_cast<unsigned>(splits),
                  static_cast<unsigned>(tiles_r));
  backward_dy_kernel<T><<<grid, kThreads, 0, stream>>>(
      dy, h, pi, B, dh, dpi, s, scaling, split_cols, vec_ok(dy, s.d_out, sizeof(T)),
      vec_ok(h, s.r, sizeof(float)), vec_ok(B, s.r, sizeof(T)));
  return cudaGetLastError();
}

cudaError_t launch_softmax_backward(const float* pi, const float* dpi, const float* dpi_extra,
                                    float* dz, int64_t rows, int64_t N, cudaStream_t stream) {
  softmax_backward_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(pi, dpi, dpi_extra, dz, rows, N);
  return cudaGetLastError();
}

#define MTLORA_INSTANTIATE_DY(T)                                                               \
  template cudaError_t launch_backward_dy<T>(const T*, const float*, const float*, const T*,   \
                                             float*, float*, const MixShape&, float, bool, int, \
                                             cudaStream_t);
MTLORA_INSTANTIATE_DY(float)
MTLORA_INSTANTIATE_DY(__half)
MTLORA_INSTANTIATE_DY(__nv_bfloat16)

}  // namespace mtlora
