// Backward, the dy side: dh and dpi (one kernel, one pass over dy), then the softmax backward.
// NOT verified on hardware (emulated on the CPU only); see mtlora.h.
#include <algorithm>

#include "common.cuh"
#include "mtlora.h"

namespace mtlora {
namespace {

// Block (bx, by) owns tokens [t0, t0 + 64) and the output columns [jbeg, jend) of split by.
// It never forms ye = h . B_e^T: with u_e = dy . B_e over the columns of one group G,
//   dh += s * pi[:, G, e] * u_e     and     dpi[:, G, e] += s * rowsum(h * u_e)
// (dpi = s * sum_{j in G} dy_j (h . B_e^T)_j = s * h . u_e). u is a tile GEMM of dy against
// the concatenated B_e: a u tile holds ue experts' slices of w ranks (ue * w <= 64 columns),
// its K runs over kUCols columns of one group at a time (a pass's 64 x kUCols dy rows stay in
// L2 while the next u tiles re-read them), and its epilogue adds into the fp32 dh and dpi
// (a 64 x w and a 64 x ue read-modify-write per u tile). Ranks beyond 64 are slices of 64
// looped in the block (dy read once per slice).
// Every dh / dpi element the block touches has this block as its only writer: split by writes
// rows [t0, t0 + 64) of its own dh and dpi, slab by of the workspace when the launch splits
// the columns (slab_stride floats apart), which reduce_splits_kernel then adds in split order.
// The block zeroes those rows itself first. No atomics: deterministic in every mode.
//
// Launch bounds (kThreads, 2): two blocks per SM, the occupancy the column splits aim for.
constexpr int kUCols = 512;

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    backward_dy_kernel(const T* __restrict__ dy, const float* __restrict__ h,
                       const float* __restrict__ pi, const T* __restrict__ B, float* dh,
                       float* dpi, int64_t slab_stride, MixShape s, float scaling, int split_cols,
                       bool vec_dy) {
  MTLORA_TILE_SMEM(T, 64);
  // Column, rank and expert indices are ints (d_out, r, g*N < kMaxRowLength, checked on the
  // host): half the registers of int64 for the loop state; token offsets stay int64.
  const int64_t t0 = int64_t(blockIdx.x) * 64;
  const int jbeg = int(blockIdx.y) * split_cols;
  const int jend = min(jbeg + split_cols, int(s.d_out));
  const int c = int(s.d_out / s.g), N = int(s.N), r = int(s.r), gN = int(s.g * s.N);
  const int64_t rows = min(int64_t(64), s.T - t0);
  dh += blockIdx.y * slab_stride + t0 * r;  // this block's rows of its split's dh and dpi
  dpi += blockIdx.y * slab_stride + t0 * gN;
  for (int64_t i = threadIdx.x; i < rows * r; i += kThreads) dh[i] = 0.f;
  for (int64_t i = threadIdx.x; i < rows * gN; i += kThreads) dpi[i] = 0.f;
  __syncthreads();  // the epilogues' read-modify-writes may fall to other threads

  for (int rc0 = 0; rc0 < r; rc0 += BN) {
    const int w = min(BN, r - rc0);   // ranks of this slice
    const int ue = min(N, BN / w);    // experts per u tile
    for (int G = jbeg / c; G <= (jend - 1) / c; ++G) {
      const int jl = max(G * c, jbeg), jh = min(G * c + c, jend);
      for (int s0 = jl; s0 < jh; s0 += kUCols) {
        const int se = min(s0 + kUCols, jh);
        for (int e0 = 0; e0 < N; e0 += ue) {
          const int nu = min(ue, N - e0);  // experts in this u tile
          // u[t][q] = sum_j dy[t][j] B[e0 + q / w][j][rc0 + q % w], j in [s0, se)
          TileMma<T, 64> u;
          u.zero();
          auto dys = rows_loader<64>(As, dy, s.d_out, t0, s.T, se, vec_dy, Identity{});
          const int64_t ld_e = s.d_out * r;
          auto col_at = [=](int64_t q) { return int(q) / w * ld_e + int(q) % w; };
          auto bs = cols_loader<BN>(Bs, B + e0 * ld_e + rc0, r, se, 0, nu * w, Identity{},
                                    static_cast<T*>(nullptr), col_at);
          gemm_over_k(u, dys, bs, s0, se);
          u.store(Cs);
          __syncthreads();
          // dh[t, rc0 + k] += s * sum_e pi[t, G, e0 + e] u[t][e * w + k]
          for (int q = threadIdx.x; q < rows * w; q += kThreads) {
            const int rr = q / w, k = q % w;
            const float* pi_t = pi + (t0 + rr) * gN + G * N + e0;
            const float* u_t = Cs + rr * LDC + k;
            float sum = 0.f;
            for (int e = 0; e < nu; ++e) sum += pi_t[e] * u_t[e * w];
            dh[int64_t(rr) * r + rc0 + k] += scaling * sum;  // 63 * r passes 2^31 at r > 2^25
          }
          if (N > 1) {
            for (int q = threadIdx.x; q < rows * nu; q += kThreads) {
              const int rr = q / nu, e = q % nu;
              const float* h_t = h + (t0 + rr) * r + rc0;
              const float* u_e = Cs + rr * LDC + e * w;
              float sum = 0.f;
              for (int k = 0; k < w; ++k) sum += h_t[k] * u_e[k];
              dpi[int64_t(rr) * gN + int64_t(G) * N + e0 + e] += scaling * sum;
            }
          }
          __syncthreads();  // Cs is rewritten by the next u tile
        }
      }
    }
  }
}

// One thread per (token, group): dz = pi * (dp - sum_e pi * dp), dp = dpi + dpi_extra, with dp
// shifted by its value at the row's (first) largest pi (by 0 if that is not finite): exact on
// the simplex, and it keeps a dominant expert's rounding out of the cancellation
// (mtlora_kernels/ops/mix.py, softmax_backward: dlogits 5.3e-5 -> within 1e-5 in fp32 for
// pi_max = 0.9996, tests/test_extreme.py).
__global__ void softmax_backward_kernel(const float* pi, const float* dpi, const float* dpi_extra,
                                        float* dz, int64_t rows, int64_t N) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t base = row * N;
  auto dp = [&](int64_t e) {
    return dpi[base + e] + (dpi_extra != nullptr ? dpi_extra[base + e] : 0.f);
  };
  int64_t top = 0;
  for (int64_t e = 1; e < N; ++e) top = pi[base + e] > pi[base + top] ? e : top;
  const float ref = isfinite(dp(top)) ? dp(top) : 0.f;  // infinities propagate as unshifted
  float dot = 0.f;
  for (int64_t e = 0; e < N; ++e) dot += pi[base + e] * (dp(e) - ref);
  for (int64_t e = 0; e < N; ++e) dz[base + e] = pi[base + e] * (dp(e) - ref - dot);
}

}  // namespace

ColumnSplits dy_column_splits(const MixShape& s, int num_sms) {
  // Split the columns only when the token tiles alone leave SMs idle (about 2 blocks per SM
  // wanted, the kernel's occupancy): each split costs a slab of T * (r + g*N) floats.
  const int64_t tiles_t = std::max<int64_t>(1, ceil_div(s.T, 64));
  const int64_t col_tiles = std::max<int64_t>(1, ceil_div(s.d_out, BN));
  const int64_t want = (2 * int64_t(std::max(num_sms, 1)) + tiles_t - 1) / tiles_t;
  const int64_t splits = std::min(want, col_tiles);
  const int64_t cols = (col_tiles + splits - 1) / splits * BN;
  return {std::max<int64_t>(1, (s.d_out + cols - 1) / cols), cols};
}

template <typename T>
cudaError_t launch_backward_dy(const T* dy, const float* h, const float* pi, const T* B, float* dh,
                               float* dpi, float* ws, const ColumnSplits& split,
                               const MixShape& s, float scaling, cudaStream_t stream) {
  const bool slabs = split.splits > 1;
  const int64_t stride = s.T * (s.r + s.g * s.N);
  const dim3 grid(ceil_div(s.T, 64), static_cast<unsigned>(split.splits));
  backward_dy_kernel<T><<<grid, kThreads, 0, stream>>>(
      dy, h, pi, B, slabs ? ws : dh, slabs ? ws + s.T * s.r : dpi, slabs ? stride : 0, s,
      scaling, int(split.cols), vec_ok(dy, s.d_out, sizeof(T)));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !slabs) return err;
  err = launch_reduce_splits(ws, stride, split.splits, s.T * s.r, 1.f, dh, stream);
  if (err != cudaSuccess) return err;
  return launch_reduce_splits(ws + s.T * s.r, stride, split.splits, s.T * s.g * s.N, 1.f, dpi,
                              stream);
}

cudaError_t launch_softmax_backward(const float* pi, const float* dpi, const float* dpi_extra,
                                    float* dz, int64_t rows, int64_t N, cudaStream_t stream) {
  softmax_backward_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(pi, dpi, dpi_extra, dz, rows, N);
  return cudaGetLastError();
}

#define MTLORA_INSTANTIATE_DY(T)                                                               \
  template cudaError_t launch_backward_dy<T>(const T*, const float*, const float*, const T*,   \
                                             float*, float*, float*, const ColumnSplits&,       \
                                             const MixShape&, float, cudaStream_t);
MTLORA_INSTANTIATE_DY(float)
MTLORA_INSTANTIATE_DY(__half)
MTLORA_INSTANTIATE_DY(__nv_bfloat16)

}  // namespace mtlora
