// Forward of the fused mix: project (h = A . drop(x), z = W . x), softmax, expand-mix.
// NOT verified on hardware (emulated on the CPU only); see mtlora.h.
#include <cmath>

#include "common.cuh"
#include "mtlora.h"

namespace mtlora {
namespace {

// Block (bx, by) computes a BM x BN tile of [h | z]: by < tiles_a covers h = drop(x) . A^T
// (dropout applied while x is staged, so the mask is never materialised), the rest covers
// z = x . W^T (the router sees x undropped). Both stay fp32: the softmax must see fp32 logits
// (SPEC section 3: rounding them to bf16 first moved outputs by 9-23%).
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads)
    project_kernel(const T* __restrict__ x, const T* __restrict__ A, const T* __restrict__ W,
                   float* __restrict__ h, float* __restrict__ z, MixShape s, int tiles_a,
                   float p, uint64_t seed, bool vec_x, bool vec_a, bool vec_w) {
  MTLORA_TILE_SMEM(T, BM);
  const int64_t t0 = int64_t(blockIdx.x) * BM;
  const bool is_a = int(blockIdx.y) < tiles_a;
  const int64_t n0 = int64_t(is_a ? blockIdx.y : blockIdx.y - tiles_a) * BN;
  const T* Wp = is_a ? A : W;
  const int64_t nrows = is_a ? s.r : s.g * s.N;
  float* out = is_a ? h : z;
  const int64_t d_in = s.d_in;
  const Dropout x_op(is_a ? p : 0.f, seed, d_in);

  TileMma<T, BM> mma;
  mma.zero();
  gemm_over_k(mma, As, Bs, 0, d_in, [&](int64_t k0) {
    load_rows<BM>(As, x, d_in, t0, s.T, k0, d_in, vec_x, x_op);
    load_rows<BN>(Bs, Wp, d_in, n0, nrows, k0, d_in, is_a ? vec_a : vec_w, Identity{});
  });
  mma.store(Cs);
  __syncthreads();
  for (int q = threadIdx.x; q < BM * BN; q += kThreads) {
    const int rr = q / BN, cc = q % BN;
    const int64_t t = t0 + rr, n = n0 + cc;
    if (t < s.T && n < nrows) out[t * nrows + n] = Cs[rr * LDC + cc];
  }
}

// One thread per (token, group) row of N logits; max-subtracted so logits of +-1e4 stay finite.
// A row of all -inf gives NaN, as torch.softmax does. z == null: uniform weights 1 / N.
__global__ void softmax_kernel(const float* z, float* pi, int64_t rows, int64_t N) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  float* pr = pi + row * N;
  if (z == nullptr) {
    for (int64_t e = 0; e < N; ++e) pr[e] = 1.f / float(N);
    return;
  }
  const float* zr = z + row * N;
  float m = -INFINITY;
  for (int64_t e = 0; e < N; ++e) m = fmaxf(m, zr[e]);
  float sum = 0.f;
  for (int64_t e = 0; e < N; ++e) sum += expf(zr[e] - m);
  const float inv = 1.f / sum;
  // In place is safe: entry e is read (again) just before it is overwritten.
  for (int64_t e = 0; e < N; ++e) pr[e] = expf(zr[e] - m) * inv;
}

// Block (bx, by) writes y[t0:t0+BM, j0:j0+BN]. When the tile lies inside one routing group G
// (the common case: c = d_out / g >= 64), the mix folds into the GEMM's A operand,
// H~[t, (e, k)] = pi[t, G, e] * h[t, k], and the tile is ONE GEMM with K = N * r (SPEC
// section 3). Otherwise (g large, c < 64) each expert's h . B_e^T goes through Cs and is
// weighted per column in the epilogue. Each thread owns 8 consecutive columns of a row, so the
// final y (+ residual) access is one 16 B vector when aligned.
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(const float* __restrict__ h, const float* __restrict__ pi,
                  const T* __restrict__ B, const T* __restrict__ residual, T* __restrict__ y,
                  MixShape s, float scaling, bool vec_h, bool vec_b, bool vec_y) {
  MTLORA_TILE_SMEM(T, BM);
  constexpr int CHUNKS = BM * (BN / 8) / kThreads;  // 8-column chunks per thread: 4 or 1
  const int64_t t0 = int64_t(blockIdx.x) * BM;
  const int64_t j0 = int64_t(blockIdx.y) * BN;
  const int64_t c = s.d_out / s.g;
  const int64_t j_last = min(j0 + BN, s.d_out) - 1;
  const int64_t g0 = j0 / c;
  const bool fold = g0 == j_last / c;

  float own[CHUNKS][8];
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i)
#pragma unroll
    for (int u = 0; u < 8; ++u) own[i][u] = 0.f;

  TileMma<T, BM> mma;
  mma.zero();
  for (int64_t e = 0; e < s.N; ++e) {
    const T* Be = B + e * s.d_out * s.r;
    auto h_op = [=](int64_t t, int64_t, float v) {
      return fold ? v * pi[(t * s.g + g0) * s.N + e] : v;
    };
    gemm_over_k(mma, As, Bs, 0, s.r, [&](int64_t k0) {
      load_rows<BM>(As, h, s.r, t0, s.T, k0, s.r, vec_h, h_op);
      load_rows<BN>(Bs, Be, s.r, j0, s.d_out, k0, s.r, vec_b, Identity{});
    });
    if (!fold) {
      mma.store(Cs);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) {
        int rr, cc;
        own_chunk(i, rr, cc);
        const int64_t t = t0 + rr;
        if (t >= s.T) continue;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int64_t j = j0 + cc + u;
          if (j < s.d_out) own[i][u] += pi[(t * s.g + j / c) * s.N + e] * Cs[rr * LDC + cc + u];
        }
      }
      mma.zero();
      // The next expert's loads do not touch Cs and its store comes after at least one more
      // __syncthreads, so no barrier is needed here.
    }
  }
  if (fold) {
    mma.store(Cs);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      int rr, cc;
      own_chunk(i, rr, cc);
#pragma unroll
      for (int u = 0; u < 8; ++u) own[i][u] = Cs[rr * LDC + cc + u];
    }
  }
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    int rr, cc;
    own_chunk(i, rr, cc);
    const int64_t t = t0 + rr, j = j0 + cc;
    if (t >= s.T) continue;
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = scaling * own[i][u];
    T* yp = y + t * s.d_out + j;
    if (vec_y && j + 8 <= s.d_out) {
      if (residual != nullptr) {
        float rv[8];
        load_vec8(residual + t * s.d_out + j, rv);
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] += rv[u];
      }
      store_vec8(yp, v);
    } else {
      for (int u = 0; u < 8 && j + u < s.d_out; ++u) {
        const float r = residual != nullptr ? to_f(residual[t * s.d_out + j + u]) : 0.f;
        yp[u] = from_f<T>(v[u] + r);
      }
    }
  }
}

template <typename T, int BM>
cudaError_t project_bm(const T* x, const T* A, const T* W, float* h, float* z, const MixShape& s,
                       float p, uint64_t seed, cudaStream_t stream) {
  const int tiles_a = int(ceil_div(s.r, BN));
  const int tiles_w = W != nullptr ? int(ceil_div(s.g * s.N, BN)) : 0;
  const dim3 grid(ceil_div(s.T, BM), tiles_a + tiles_w);
  project_kernel<T, BM><<<grid, kThreads, 0, stream>>>(
      x, A, W, h, z, s, tiles_a, p, seed, vec_ok(x, s.d_in, sizeof(T)),
      vec_ok(A, s.d_in, sizeof(T)), vec_ok(W, s.d_in, sizeof(T)));
  return cudaGetLastError();
}

template <typename T, int BM>
cudaError_t expand_bm(const float* h, const float* pi, const T* B, const T* residual, T* y,
                      const MixShape& s, float scaling, cudaStream_t stream) {
  const dim3 grid(ceil_div(s.T, BM), ceil_div(s.d_out, BN));
  const bool vy = vec_ok(y, s.d_out, sizeof(T)) &&
                  (residual == nullptr || vec_ok(residual, s.d_out, sizeof(T)));
  expand_kernel<T, BM><<<grid, kThreads, 0, stream>>>(
      h, pi, B, residual, y, s, scaling, vec_ok(h, s.r, sizeof(float)),
      vec_ok(B, s.r, sizeof(T)), vy);
  return cudaGetLastError();
}

// Decode-sized calls (T <= 16) use 16-row tiles: a 64-row tile would spend 3/4 of its tensor
// core work and staging on padding rows.
constexpr int64_t kSmallT = 16;

}  // namespace

template <typename T>
cudaError_t launch_project(const T* x, const T* A, const T* W, float* h, float* z,
                           const MixShape& s, float p, uint64_t seed, cudaStream_t stream) {
  return s.T <= kSmallT ? project_bm<T, 16>(x, A, W, h, z, s, p, seed, stream)
                        : project_bm<T, 64>(x, A, W, h, z, s, p, seed, stream);
}

cudaError_t launch_softmax(const float* z, float* pi, int64_t rows, int64_t N,
                           cudaStream_t stream) {
  softmax_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(z, pi, rows, N);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_expand(const float* h, const float* pi, const T* B, const T* residual, T* y,
                          const MixShape& s, float scaling, cudaStream_t stream) {
  return s.T <= kSmallT ? expand_bm<T, 16>(h, pi, B, residual, y, s, scaling, stream)
                        : expand_bm<T, 64>(h, pi, B, residual, y, s, scaling, stream);
}

#define MTLORA_INSTANTIATE_FORWARD(T)                                                         \
  template cudaError_t launch_project<T>(const T*, const T*, const T*, float*, float*,        \
                                         const MixShape&, float, uint64_t, cudaStream_t);     \
  template cudaError_t launch_expand<T>(const float*, const float*, const T*, const T*, T*,   \
                                        const MixShape&, float, cudaStream_t);
MTLORA_INSTANTIATE_FORWARD(float)
MTLORA_INSTANTIATE_FORWARD(__half)
MTLORA_INSTANTIATE_FORWARD(__nv_bfloat16)

}  // namespace mtlora
