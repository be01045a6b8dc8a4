// The forward kernel of the fused mix, shared by its two translation units: mix_forward.cu
// (launches without clusters, and the plan) and mix_forward_cluster.cu (launches with
// thread-block clusters, sm_90), which compile in parallel. Each instantiates only its own
// variant of the kernel.
#pragma once

// Forward of the fused mix in one pass: each block projects its tokens (h = A . drop(x) and the
// router logits z = W . x of the groups it needs), takes the per-group softmax, and writes its
// output tiles y = residual + s * sum_e pi_e * (h . B_e^T). One launch; x is read by every
// column split of a token block (L2 hits after the first), y written once.
// NOT verified on hardware (emulated on the CPU only); see mtlora.h.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "mtlora.h"

namespace mtlora {
namespace {

// Thread-block clusters (sm_90+): the device code of the cluster path exists only where the
// compiler targets sm_90 or later (and on the host side of the build, and in the CPU emulator);
// forward_max_cluster tells the host whether the binary that runs has it.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define MTLORA_CLUSTERS 1
#else
#define MTLORA_CLUSTERS 0
#endif

// The blocks of a cluster: at most 8, the size every sm_90 GPU takes without an opt-in.
constexpr int kMaxCluster = 8;

// This block's rank in its cluster, a barrier of the cluster's threads (release / acquire: the
// shared memory writes of every block before it are visible to every block after it), and
// the address of `p` in the shared memory of the cluster's block `rank`. A binary without
// clusters never gets a cluster launch (forward_max_cluster); if it did, it traps.
__device__ __forceinline__ int cluster_rank() {
#if MTLORA_CLUSTERS
  return int(__clusterRelativeBlockRank());
#else
  __trap();
  return 0;
#endif
}
__device__ __forceinline__ void cluster_sync() {
#if MTLORA_CLUSTERS
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
#else
  __trap();
#endif
}
__device__ __forceinline__ const float* cluster_peer(const float* p, int rank) {
#if MTLORA_CLUSTERS
  return static_cast<const float*>(__cluster_map_shared_rank(p, unsigned(rank)));
#else
  __trap();
  return p;
#endif
}

// Decode-sized calls (T <= 16) use 16-row tiles: a 64-row tile would spend 3/4 of its tensor
// core work and staging on padding rows. In fp16 / bf16 their K-chunks are 64 wide, fp32 keeps
// 32 (kChunk in common.cuh).
constexpr int64_t kSmallT = 16;

// n / d and n % d (n >= 0) in per-element index math: a shift and a mask when d is a power of
// two (r = 8, 16, 32, 64 in practice) instead of a 64-bit integer division (a range check and
// ~20 instructions on its fast path) per element of a staged operand.
struct DivBy {
  int64_t d;
  int shift = 0;  // log2 d, or -1 when d is not a power of two
  __device__ __forceinline__ explicit DivBy(int64_t d_) : d(d_) {
    while ((int64_t(1) << shift) < d) ++shift;
    if ((int64_t(1) << shift) != d) shift = -1;
  }
  __device__ __forceinline__ int64_t div(int64_t n) const {
    return shift >= 0 ? n >> shift : n / d;
  }
  __device__ __forceinline__ int64_t mod(int64_t n) const {
    return shift >= 0 ? n & (d - 1) : n % d;
  }
};

// pi = softmax(z) over one row of N logits; max-subtracted so logits of +-1e4 stay finite. A
// row of all -inf gives NaN, as torch.softmax does. z == null: uniform weights 1 / N. z may
// alias pi: entry e is read (again) just before it is overwritten.
__device__ __forceinline__ void softmax_row(const float* z, float* pi, int64_t N) {
  if (z == nullptr) {
    for (int64_t e = 0; e < N; ++e) pi[e] = 1.f / float(N);
    return;
  }
  float m = -INFINITY;
  for (int64_t e = 0; e < N; ++e) m = fmaxf(m, z[e]);
  float sum = 0.f;
  for (int64_t e = 0; e < N; ++e) sum += expf(z[e] - m);
  const float inv = 1.f / sum;
  for (int64_t e = 0; e < N; ++e) pi[e] = expf(z[e] - m) * inv;
}

// Block (bx, by): tokens t0 .. t0 + BM, output columns [col_lo, col_hi) = the BN-wide tiles
// by * tiles_per_split .. of d_out, which touch the ngroups groups from g_first on.
//
// Phase 1, the projection: one tile GEMM over d_in per 64 columns of the packed operand
// [A; W rows g_first*N .. (g_first+ngroups)*N), so at the defaults (r = 16, N = 16, g = 2) h
// and all logits come from ONE sweep over x. With dropout, h's columns and the logits' never
// share a sweep (h sees drop(x), the router x). Logits stay fp32 into the softmax (SPEC
// section 3: rounding them to bf16 first moved outputs by 9-23%).
// Phase 2, the expand-mix, one BM x BN tile at a time. When the tile lies inside one routing
// group G (every tile when c = d_out / g is a multiple of 64, the common case) the mix folds
// into the GEMM's A operand, H~[t, (e, k)] = pi[t, G, e] * h[t, k], and the tile is ONE GEMM
// with K = N * r (SPEC section 3). Otherwise (c < 64, or a tile across a group boundary) each
// expert's h . B_e^T goes through Cs and is weighted per column in the epilogue. Each thread
// owns 8 consecutive columns of a row, so the final y (+ residual) access is one 16 B vector
// when aligned.
//
// With a cluster (ForwardPlan::cluster > 1, sm_90), its blocks are consecutive splits of one
// token block and share phase 1 instead of each repeating it: each sweeps its 1/cluster of d_in
// (whole 64-wide pieces) for the packed rows of every group the cluster's splits touch, leaves
// its partial sums in its Cs, and after a cluster barrier every block adds all of them from the
// cluster's shared memory, in rank order (the same order everywhere: every split holds
// bitwise the same h), and keeps what it needs. A second barrier ends the reads before the
// next sweep overwrites Cs. At decode sizes phase 1 is most of a block's traffic (at the
// defaults ~384 KB of x, A and W_route against ~32 KB of B for its tile): a cluster of 8 cuts
// it to ~48 KB per block (counts, not measurements).
//
// h and pi pass through global memory between the phases, read back only by the block that
// wrote them (after a barrier, which makes a block's global writes visible to the block): the
// outputs h and pi when the block owns them, else its slice of ws. Split 0 writes h; split
// s > 0 keeps its copy in ws. A group's pi is written by the split holding the group's first
// column; only a split's first group can have started in an earlier split, and that one
// group's weights go to ws. So every output element has exactly one writer and no block reads
// what another block writes.
//
// Phase 1's sweeps over x are the long K loops (d_in), and at decode sizes the whole cost. In
// 16-bit the packed weights take the cp.async pipeline (gemm_over_k_pipelined: kForwardStages
// - 1 chunks in flight, no registers for them), and so does x without dropout (inference, and
// the router's sweep in training); x with dropout goes through registers, one chunk ahead
// (the mask is applied on the way). fp32 takes the register prefetch of gemm_over_k for both.
// Phase 2's B tiles take the pipeline too (the pi-weighted h goes through registers).
//
// Shared memory is dynamic (ForwardSmem, up to 71.8 KB at BM = 16); forward_bm opts in.
// Launch bounds (kThreads, 2): two blocks per SM, the occupancy forward_plan's column splits
// aim for (and what fits: 2 x 71.8 KB on an A100's 164 KB per SM). ptxas (CUDA 13.0) then
// takes 143-190 registers at BM = 16 and 240-255 at BM = 64, with no spills (sm_80 and sm_90,
// python/tools/KERNELS.md). Without a minimum, ptxas once held this kernel to 64 / 128
// registers and spilled 8-92 B.
// 16-bit: pipeline stages for phase 1's sweeps over x and phase 2's B tiles. A decode block
// (BM = 16) is one of at most 2 per SM that each sweep all of A and W_route (every column
// split recomputes h and its logits), so its sweep is bound by latency: 6 stages keep 5
// K-chunks (up to 4 KB of real rows each at the defaults) in flight instead of 2, at 71.8 KB
// of shared memory. BM = 64 launches (prefill, training) have many token blocks, which hide
// each other's latency, and keep 3 (47.0 KB). Counts, not measurements (README, "What is
// verified"). A cluster's decode blocks sweep only their slice of d_in (at most 1/2 of it,
// forward_plan): 4 stages, which also keeps that kernel (~8 more live values for the slice)
// within 255 registers without spilling (6 stages spilled 28-32 B in 16-bit on sm_90).
template <int BM, bool kCluster>
constexpr int kForwardStages = BM == 16 ? (kCluster ? 4 : 6) : 3;
template <typename T, int BM, bool kCluster>
using ForwardSmem =
    std::conditional_t<sizeof(T) == 2, StagedSmem<T, BM, kForwardStages<BM, kCluster>>,
                       TileSmem<T, BM>>;

// kCluster: the launch has clusters of `cluster` > 1 blocks (a separate instantiation, so that
// the kernel without them keeps its registers: the slice's bounds and bases are computed values
// where the plain kernel reads d_in and the pointers from its parameters).
template <typename T, int BM, bool kCluster>
__global__ void __launch_bounds__(kThreads, 2)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ A, const T* __restrict__ W,
                   const float* __restrict__ logits, const T* __restrict__ B,
                   const T* __restrict__ residual, T* __restrict__ y, float* h_out, float* pi_out,
                   float* ws, MixShape s, int64_t tiles_per_split, int cluster, float scaling,
                   float p, uint64_t seed, bool vec_x, bool vec_a, bool vec_w, bool vec_b,
                   bool vec_y) {
  // 16-bit: the pipelined layout (stage 0 doubles as the As / Bs of the synchronous tile
  // GEMMs); fp32 sweeps with the register prefetch only.
  constexpr bool kPipelined = sizeof(T) == 2;
  constexpr int kStages = kForwardStages<BM, kCluster>;
  using Smem = ForwardSmem<T, BM, kCluster>;
  extern __shared__ __align__(128) unsigned char smem_raw_[];  // Smem::kBytes
  T* As = reinterpret_cast<T*>(smem_raw_ + Smem::kAsOff);
  T* Bs = reinterpret_cast<T*>(smem_raw_ + Smem::kBsOff);
  float* Cs = reinterpret_cast<float*>(smem_raw_ + Smem::kCsOff);
  constexpr int KC = kChunk<T, BM>;                 // K-chunk of every tile GEMM here
  constexpr int CHUNKS = BM * (BN / 8) / kThreads;  // 8-column chunks per thread: 4 or 1
  const int64_t t0 = int64_t(blockIdx.x) * BM;
  const int64_t split = blockIdx.y;
  const int64_t c = s.d_out / s.g, N = s.N, r = s.r;
  const int64_t col_lo = split * tiles_per_split * BN;
  const int64_t col_hi = min(col_lo + tiles_per_split * BN, s.d_out);
  const int64_t g_first = col_lo / c, ngroups = (col_hi - 1) / c - g_first + 1;
  const bool own_first = g_first * c >= col_lo;
  float* h = split == 0 ? h_out : ws + (split - 1) * s.T * (r + N);
  float* pi_first = h + s.T * r;  // [T, N]: the first group's weights when not owned
  auto pi_row = [=](int64_t t, int64_t G) {
    return G == g_first && !own_first ? pi_first + t * N : pi_out + (t * s.g + G) * N;
  };

  // ---- phase 1: h and the logits of groups g_first .. g_first + ngroups - 1 ----
  // The sweeps cover K = [k_lo, k_hi) of d_in and the logits of groups sg_first .. sg_first +
  // sgroups - 1: the whole of d_in and this block's groups, or with a cluster this block's
  // slice of d_in and the groups of all the cluster's splits.
  if (!kCluster) cluster = 1;
  const int rank = kCluster ? cluster_rank() : 0;
  const int64_t sweep_lo = (split - rank) * tiles_per_split * BN;
  const int64_t sweep_hi = min(sweep_lo + cluster * tiles_per_split * BN, s.d_out);
  const int64_t sg_first = sweep_lo / c, sgroups = (sweep_hi - 1) / c - sg_first + 1;
  const int64_t k_slice = ((s.d_in + cluster - 1) / cluster + 63) / 64 * 64;
  const int64_t k_lo = kCluster ? min(s.d_in, rank * k_slice) : 0;
  const int64_t k_hi = kCluster ? min(s.d_in, k_lo + k_slice) : s.d_in;
  static_assert(64 % KC == 0, "a cluster's slices of d_in are whole K-chunks");
  const int64_t nz = W != nullptr ? sgroups * N : 0;
  const int64_t zoff = (p > 0.f && nz > 0) ? (r + BN - 1) / BN * BN : r;
  // The sweeps address d_in from k_lo on (k below is relative to it).
  const int64_t k_len = k_hi - k_lo;
  const T* const xk = x + k_lo;
  const T* const Ak = A + k_lo;
  const T* const Wk = W != nullptr ? W + sg_first * N * s.d_in + k_lo : nullptr;
  const int64_t ld = s.d_in;
  auto packed = [=](int64_t q, int64_t k) {
    if (q < r) return ElemSrc<T>{Ak + q * ld + k, vec_a};
    if (q >= zoff && q < zoff + nz) return ElemSrc<T>{Wk + (q - zoff) * ld + k, vec_w};
    return ElemSrc<T>{nullptr, false};
  };
  for (int64_t q0 = 0; q0 < zoff + nz; q0 += BN) {
    const Dropout x_op(q0 < r ? p : 0.f, seed, s.d_in, k_lo);
    TileMma<T, BM> mma;
    mma.zero();
    if constexpr (kPipelined) {  // the packed weights through cp.async, kStages - 1 chunks ahead
      auto aw = async_tile_loader<BN, KC>(Bs, packed, q0, k_len);
      if (x_op.p <= 0.f) {  // x as it is: the pipeline too
        auto xs = async_rows_loader<BM, KC>(As, xk, s.d_in, t0, s.T, k_len, vec_x);
        gemm_over_k_pipelined<kStages>(mma, xs, aw, 0, k_len);
      } else {  // dropout on x: through registers, in stages 0 and 1 of As
        auto xs = rows_loader<BM, KC>(As, xk, s.d_in, t0, s.T, k_len, vec_x, x_op);
        T* const As2 = As + Smem::kAsStage / int(sizeof(T));
        gemm_over_k_pipelined<kStages>(mma, xs, aw, 0, k_len, As2);
      }
    } else {  // fp32: both through registers
      auto xs = rows_loader<BM, KC>(As, xk, s.d_in, t0, s.T, k_len, vec_x, x_op);
      auto aw = tile_loader<BN, KC>(Bs, packed, q0, k_len, Identity{});
      gemm_over_k(mma, xs, aw, 0, k_len);
    }
    mma.store(Cs);
    if constexpr (kCluster) {
      cluster_sync();  // every block's partial sums are in its Cs
    } else {
      __syncthreads();
    }
    for (int i = threadIdx.x; i < BM * BN; i += kThreads) {
      const int rr = i / BN, cc = i % BN;
      const int64_t t = t0 + rr, q = q0 + cc;
      if (t >= s.T) continue;
      float v = Cs[rr * LDC + cc];
      if constexpr (kCluster) {
        v = 0.f;
        for (int b = 0; b < cluster; ++b) v += cluster_peer(Cs, b)[rr * LDC + cc];
      }
      if (q < r) {
        h[t * r + q] = v;
      } else if (q >= zoff && q < zoff + nz) {
        const int64_t n = q - zoff, G = sg_first + n / N;  // logit (G, n % N)
        if (G >= g_first && G < g_first + ngroups) pi_row(t, G)[n % N] = v;
      }
    }
    // The next sweep's Cs store follows at least one more barrier: inside gemm_over_k, or
    // (its K range may be empty in a cluster) this one, after which no block reads Cs.
    if constexpr (kCluster) cluster_sync();
  }
  __syncthreads();  // the logits of every row are in place
  for (int64_t i = threadIdx.x; i < BM * ngroups; i += kThreads) {
    const int64_t t = t0 + i / ngroups, G = g_first + i % ngroups;
    if (t >= s.T) continue;
    float* pr = pi_row(t, G);
    // router: in place; external logits: from them; neither: uniform (plain LoRA, N == 1)
    softmax_row(W != nullptr ? pr : logits != nullptr ? logits + (t * s.g + G) * N : nullptr,
                pr, N);
  }
  __syncthreads();  // h and pi of this block's rows are complete

  // ---- phase 2: the expand-mix, tile by tile ----
  const bool vec_h = vec_ok(h, r, sizeof(float));
  for (int64_t j0 = col_lo; j0 < col_hi; j0 += BN) {
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
    if (fold) {
      // K = N * r in one GEMM: column kap = e * r + k of H~ is pi[t, g0, e] * h[t, k], of the
      // B operand B[e, j, k]. A vector never crosses an expert (r % V == 0 when vec_h / vec_b).
      const DivBy by_r(r);
      auto h_at = [=](int64_t t, int64_t kap) {
        return ElemSrc<float>{t < s.T ? h + t * r + by_r.mod(kap) : nullptr, vec_h};
      };
      auto b_at = [=](int64_t j, int64_t kap) {
        return ElemSrc<T>{j < s.d_out ? B + (by_r.div(kap) * s.d_out + j) * r + by_r.mod(kap)
                                      : nullptr,
                          vec_b};
      };
      auto by_pi = [=](int64_t t, int64_t kap, float v) {
        return v * pi_row(t, g0)[by_r.div(kap)];
      };
      auto hs = tile_loader<BM, KC>(As, h_at, t0, N * r, by_pi);
      if constexpr (kPipelined) {  // B through the pipeline, H~ through registers
        T* const As2 = As + Smem::kAsStage / int(sizeof(T));
        gemm_over_k_pipelined<kStages>(mma, hs, async_tile_loader<BN, KC>(Bs, b_at, j0, N * r),
                                       0, N * r, As2);
      } else {
        auto bs = tile_loader<BN, KC>(Bs, b_at, j0, N * r, Identity{});
        gemm_over_k(mma, hs, bs, 0, N * r);
      }
      mma.store(Cs);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < CHUNKS; ++i) {
        int rr, cc;
        own_chunk(i, rr, cc);
#pragma unroll
        for (int u = 0; u < 8; ++u) own[i][u] = Cs[rr * LDC + cc + u];
      }
    } else {
      // Per expert: h . B_e^T through Cs, weighted per column by its group's pi.
      for (int64_t e = 0; e < N; ++e) {
        const T* Be = B + e * s.d_out * r;
        auto hs = rows_loader<BM, KC>(As, h, r, t0, s.T, r, vec_h, Identity{});
        auto bs = rows_loader<BN, KC>(Bs, Be, r, j0, s.d_out, r, vec_b, Identity{});
        gemm_over_k(mma, hs, bs, 0, r);
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
            if (j < s.d_out) own[i][u] += pi_row(t, j / c)[e] * Cs[rr * LDC + cc + u];
          }
        }
        mma.zero();
        // The next expert's (or tile's) loads do not touch Cs and its store comes after at
        // least one more __syncthreads, so no barrier is needed here.
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
          const float rv = residual != nullptr ? to_f(residual[t * s.d_out + j + u]) : 0.f;
          yp[u] = from_f<T>(v[u] + rv);
        }
      }
    }
  }
}

template <typename T, int BM, bool kCluster>
cudaError_t forward_bm(const ForwardArgs<T>& a, cudaStream_t stream) {
  const MixShape& s = a.s;
  const ForwardPlan& plan = a.plan;
  const dim3 grid(unsigned(plan.row_blocks), unsigned(plan.splits));
  const bool vy = vec_ok(a.y, s.d_out, sizeof(T)) &&
                  (a.residual == nullptr || vec_ok(a.residual, s.d_out, sizeof(T)));
  constexpr int smem = ForwardSmem<T, BM, kCluster>::kBytes;
  const cudaError_t err = cudaFuncSetAttribute(
      forward_kernel<T, BM, kCluster>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // returned here: not left for a later launch check to report
    return err;
  }
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 1;
  cluster.val.clusterDim.y = unsigned(plan.cluster);  // consecutive splits of a token block
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &cluster;
  cfg.numAttrs = kCluster ? 1 : 0;
  const cudaError_t launched = cudaLaunchKernelEx(
      &cfg, forward_kernel<T, BM, kCluster>, a.x, a.A, a.W, a.logits, a.B, a.residual, a.y, a.h,
      a.pi, a.ws, s, plan.tiles_per_split, int(plan.cluster), a.scaling, a.dropout_p, a.seed,
      vec_ok(a.x, s.d_in, sizeof(T)), vec_ok(a.A, s.d_in, sizeof(T)),
      vec_ok(a.W, s.d_in, sizeof(T)), vec_ok(a.B, s.r, sizeof(T)), vy);
  (void)cudaGetLastError();  // returned here: not left for a later launch check to report
  return launched;
}

}  // namespace

// The launch of forward_kernel with clusters of plan.cluster blocks (mix_forward_cluster.cu).
template <typename T>
cudaError_t launch_forward_clustered(const ForwardArgs<T>& a, cudaStream_t stream);

}  // namespace mtlora
