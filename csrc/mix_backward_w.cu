// Backward, the weight gradients: dB, and dA / dW_route in one launch.
// Both are GEMMs that reduce over the tokens (K = T) in a fixed order: inside one block, or,
// when the output tiles alone would leave SMs idle, over token splits whose fp32 partial sums
// reduce_splits_kernel adds in split order (backward_plan). No atomics, deterministic in every
// mode. NOT verified on hardware; see mtlora.h.
//
// Launch bounds (kThreads, 4): these run the longest K loops and are memory-bound, so they
// keep four blocks per SM (the occupancy backward_plan's token splits aim for): ptxas
// (CUDA 13.0) fits them in 123-128 registers with no spills. Without a minimum it took 132-167
// for some variants and held backward_db_kernel<__half> to 96 with a 22 B spill (sm_80).
#include <algorithm>

#include "common.cuh"
#include "mtlora.h"

namespace mtlora {
namespace {

// Token splits are runs of whole chunks of this many tokens: whole K-chunks of the tile GEMMs,
// so only the last split of a launch has a partly masked chunk (the loaders mask at its end).
constexpr int64_t kSplitTokens = 64;

// Where a block's [rows][BN] tile result goes: the output, converted and scaled (one token
// split), or the fp32 slab of its split, summed and scaled later by reduce_splits_kernel.
template <typename T>
struct TileOut {
  T* out;
  float* slab;  // null: no token splits
  float scale;
  __device__ __forceinline__ void operator()(int64_t i, float v) const {
    if (slab != nullptr) {
      slab[i] = v;
    } else {
      out[i] = from_f<T>(scale * v);
    }
  }
};

// The tokens [t_lo, t_hi) of token split q.
struct TokenRange {
  int64_t lo, hi;
  __device__ __forceinline__ TokenRange(int64_t q, int64_t per, int64_t T)
      : lo(q * per), hi(min(q * per + per, T)) {}
};

// The grid of the dB kernel: x = column tiles of 64 inside each group (a tile never crosses
// a group, so pi is per token and expert within it), y = rank slices of 64 x expert chunks of
// ue experts (ue * slice width <= 64), z = token splits.
struct DbGrid {
  int64_t tiles_per_group, tiles_r, ue;
  explicit DbGrid(const MixShape& s)
      : tiles_per_group((s.d_out / s.g + 63) / 64),
        tiles_r((s.r + BN - 1) / BN),
        ue(s.r >= BN ? 1 : std::min<int64_t>(s.N, BN / s.r)) {}
  int64_t x(const MixShape& s) const { return s.g * tiles_per_group; }
  int64_t y(const MixShape& s) const { return tiles_r * ((s.N + ue - 1) / ue); }
};

// Block (bx, by, split) writes dB[e0 .. e0+nu, j0 .. j_hi, rc0 .. rc0+w] over its token
// split's tokens as one tile GEMM with K = tokens: dB[e, j, k] = s * sum_t dy[t, j] H~[t, q]
// with q = (e - e0) * w + k and H~[t, q] = pi[t, G, e] h[t, rc0 + k], so dy is staged once per
// nu experts (was once per expert) and the GEMM's N holds nu * w columns (was r of 64). Both
// operands are staged transposed (tokens along K); H~ reads h through a column map and weighs
// it by pi on the way into shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    backward_db_kernel(const T* __restrict__ dy, const float* __restrict__ h,
                       const float* __restrict__ pi, T* __restrict__ dB, float* __restrict__ ws,
                       MixShape s, float scaling, DbGrid grid, int64_t tokens_per_split) {
  MTLORA_TILE_SMEM(T, 64);
  // Column, rank and expert indices are ints (d_out, r, g*N < kMaxRowLength).
  const int c = int(s.d_out / s.g), N = int(s.N), r = int(s.r), gN = int(s.g * s.N);
  const int G = int(blockIdx.x / grid.tiles_per_group);
  const int j0 = G * c + int(blockIdx.x % grid.tiles_per_group) * 64;
  const int j_hi = min(j0 + 64, G * c + c);
  const int rc0 = int(blockIdx.y % grid.tiles_r) * BN, w = min(BN, r - rc0);
  const int e0 = int(blockIdx.y / grid.tiles_r * grid.ue), nu = min(int(grid.ue), N - e0);
  const TokenRange tr(blockIdx.z, tokens_per_split, s.T);
  // The H~ loader keeps one column q per thread: its expert's weight row, found once, advances
  // g*N per token (a division per element cost 16 of them per K-chunk).
  const float* pi_q = pi + G * N + e0 + min(col_of_thread<BN>() / w, nu - 1);
  auto by_pi = [=](int64_t t, int64_t, float v) { return v * pi_q[t * gN]; };
  auto rank_of = [=](int64_t q) { return int64_t(rc0 + int(q) % w); };

  TileMma<T, 64> acc;
  acc.zero();
  auto dys = cols_loader<64>(As, dy, s.d_out, tr.hi, j0, j_hi, Identity{});  // As[j][t]
  auto hs = cols_loader<BN>(Bs, h, r, tr.hi, 0, nu * w, by_pi, static_cast<T*>(nullptr),
                            rank_of);  // Bs[q][t]
  gemm_over_k(acc, dys, hs, tr.lo, tr.hi);
  acc.store(Cs);
  __syncthreads();
  const TileOut<T> put{dB, ws != nullptr ? ws + blockIdx.z * s.N * s.d_out * r : nullptr,
                       scaling};
  for (int q = threadIdx.x; q < 64 * BN; q += kThreads) {
    const int rr = q / BN, cc = q % BN;
    const int64_t j = j0 + rr;
    if (j < j_hi && cc < nu * w)
      put(((e0 + cc / w) * s.d_out + j) * r + rc0 + cc % w, Cs[rr * LDC + cc]);
  }
}

// Block (bx, by, split) writes a 64 x 64 tile of dA = dh^T . drop(x) (by < tiles_a) or of
// dW = dz^T . x (the rest) over its token split's tokens; the dropout mask is regenerated from
// the seed while x is staged. A split's slab holds [dA; dW] as rows of d_in.
// For 16-bit x the fp32 dh / dz enter the tensor cores split in two halves (split_store), so
// the reduction over the tokens sees them to about 16 bits instead of 8 (bf16).
template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    backward_daw_kernel(const T* __restrict__ x, const float* __restrict__ dh,
                        const float* __restrict__ dz, T* __restrict__ dA, T* __restrict__ dW,
                        float* __restrict__ ws, MixShape s, int tiles_a, float p, uint64_t seed,
                        int64_t tokens_per_split) {
  __shared__ __align__(128) unsigned char smem_raw_[TileSmem<T, 64>::kSplitBytes];
  const TileBuffers<T> tb = tile_buffers<T, 64>(smem_raw_);
  T* As = tb.As;
  T* Bs = tb.Bs;
  float* Cs = tb.Cs;
  T* As_lo = tb.As_lo;
  const int64_t i0 = int64_t(blockIdx.x) * BN;
  const bool is_a = int(blockIdx.y) < tiles_a;
  const int64_t n0 = int64_t(is_a ? blockIdx.y : blockIdx.y - tiles_a) * 64;
  const TokenRange tr(blockIdx.z, tokens_per_split, s.T);
  const float* D = is_a ? dh : dz;
  const int64_t nrows = is_a ? s.r : s.g * s.N;
  const int64_t d_in = s.d_in;
  const Dropout x_op(is_a ? p : 0.f, seed, d_in);

  TileMma<T, 64> acc;
  acc.zero();
  auto ds = cols_loader<64>(As, D, nrows, tr.hi, n0, nrows, Identity{}, As_lo);  // As[n][t]
  auto xs = cols_loader<BN>(Bs, x, d_in, tr.hi, i0, d_in, x_op);                // Bs[i][t]
  gemm_over_k(acc, ds, xs, tr.lo, tr.hi);
  acc.store(Cs);
  __syncthreads();
  const int64_t slab_rows = s.r + (dz != nullptr ? s.g * s.N : 0);
  float* slab = ws != nullptr ? ws + (blockIdx.z * slab_rows + (is_a ? 0 : s.r)) * d_in : nullptr;
  const TileOut<T> put{is_a ? dA : dW, slab, 1.f};
  for (int q = threadIdx.x; q < 64 * BN; q += kThreads) {
    const int rr = q / BN, cc = q % BN;
    const int64_t n = n0 + rr, i = i0 + cc;
    if (n < nrows && i < d_in) put(n * d_in + i, Cs[rr * LDC + cc]);
  }
}

// Splits of a reduction over T whose launch has `blocks` blocks without them: as many as give
// the device 4 blocks per SM, at most one per kSplitTokens chunk.
TokenSplits token_splits(int64_t T, int64_t blocks, int num_sms) {
  const int64_t chunks = std::max<int64_t>(1, (T + kSplitTokens - 1) / kSplitTokens);
  const int64_t target = 4 * int64_t(std::max(num_sms, 1));
  const int64_t want =
      std::max<int64_t>(1, std::min(chunks, target / std::max<int64_t>(blocks, 1)));
  const int64_t per = (chunks + want - 1) / want * kSplitTokens;
  return {std::max<int64_t>(1, (T + per - 1) / per), per};
}

}  // namespace

BackwardPlan backward_plan(const MixShape& s, bool routed, int num_sms) {
  BackwardPlan plan{};
  plan.dy = dy_column_splits(s, num_sms);
  const DbGrid db(s);
  plan.db = token_splits(s.T, db.x(s) * db.y(s), num_sms);
  const int64_t daw_rows = s.r + (routed ? s.g * s.N : 0);
  const int64_t daw_tiles = ceil_div(s.r, 64) + (routed ? ceil_div(s.g * s.N, 64) : 0);
  plan.daw = token_splits(s.T, ceil_div(s.d_in, BN) * daw_tiles, num_sms);
  const int64_t db_ws = plan.db.splits > 1 ? plan.db.splits * s.N * s.d_out * s.r : 0;
  const int64_t daw_ws = plan.daw.splits > 1 ? plan.daw.splits * daw_rows * s.d_in : 0;
  const int64_t dy_ws = plan.dy.splits > 1 ? plan.dy.splits * s.T * (s.r + s.g * s.N) : 0;
  plan.ws_floats = std::max({dy_ws, db_ws, daw_ws});
  // Blocks along y: dy's column splits, dB's rank slices x expert chunks, dA / dW's row tiles
  // of r and g*N, dx's column tiles of d_in (launch_backward_dx).
  plan.grid_y = std::max({plan.dy.splits, db.y(s), daw_tiles, int64_t(ceil_div(s.d_in, BN))});
  return plan;
}

template <typename T>
cudaError_t launch_backward_dB(const T* dy, const float* h, const float* pi, T* dB, float* ws,
                               const TokenSplits& split, const MixShape& s, float scaling,
                               cudaStream_t stream) {
  const DbGrid db(s);
  const bool slabs = split.splits > 1;
  const dim3 grid(static_cast<unsigned>(db.x(s)), static_cast<unsigned>(db.y(s)),
                  static_cast<unsigned>(split.splits));
  backward_db_kernel<T><<<grid, kThreads, 0, stream>>>(dy, h, pi, dB, slabs ? ws : nullptr, s,
                                                       scaling, db, split.tokens_per_split);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !slabs) return err;
  const int64_t n = s.N * s.d_out * s.r;
  return launch_reduce_splits(ws, n, split.splits, n, scaling, dB, stream);
}

template <typename T>
cudaError_t launch_backward_dAW(const T* x, const float* dh, const float* dz, T* dA, T* dW,
                                float* ws, const TokenSplits& split, const MixShape& s, float p,
                                uint64_t seed, cudaStream_t stream) {
  const int tiles_a = int(ceil_div(s.r, 64));
  const int tiles_w = dz != nullptr ? int(ceil_div(s.g * s.N, 64)) : 0;
  const bool slabs = split.splits > 1;
  const dim3 grid(ceil_div(s.d_in, BN), tiles_a + tiles_w, static_cast<unsigned>(split.splits));
  backward_daw_kernel<T><<<grid, kThreads, 0, stream>>>(x, dh, dz, dA, dW, slabs ? ws : nullptr,
                                                        s, tiles_a, p, seed,
                                                        split.tokens_per_split);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !slabs) return err;
  const int64_t stride = (s.r + (dz != nullptr ? s.g * s.N : 0)) * s.d_in;
  err = launch_reduce_splits(ws, stride, split.splits, s.r * s.d_in, 1.f, dA, stream);
  if (err != cudaSuccess || dz == nullptr) return err;
  return launch_reduce_splits(ws + s.r * s.d_in, stride, split.splits, s.g * s.N * s.d_in, 1.f,
                              dW, stream);
}

#define MTLORA_INSTANTIATE_W(T)                                                                \
  template cudaError_t launch_backward_dB<T>(const T*, const float*, const float*, T*, float*, \
                                             const TokenSplits&, const MixShape&, float,        \
                                             cudaStream_t);                                     \
  template cudaError_t launch_backward_dAW<T>(const T*, const float*, const float*, T*, T*,    \
                                              float*, const TokenSplits&, const MixShape&,      \
                                              float, uint64_t, cudaStream_t);
MTLORA_INSTANTIATE_W(float)
MTLORA_INSTANTIATE_W(__half)
MTLORA_INSTANTIATE_W(__nv_bfloat16)

}  // namespace mtlora
