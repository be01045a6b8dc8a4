// Forward of the fused mix: the plan of a launch and its launch without clusters (the kernel is
// in mix_forward.cuh; launches with clusters are mix_forward_cluster.cu's).
// NOT verified on hardware (emulated on the CPU only); see mtlora.h.
#include <numeric>
#include <utility>

#include "mix_forward.cuh"

namespace mtlora {

namespace {

// The packed rows a block sweeps in phase 1 when its columns are a run of `cols` (a split's, or
// a cluster's): A's r, and with a router (W) the router rows of every group the run touches,
// for the worst run (external logits are read, not projected: r alone). A full run's groups
// depend only on where it starts within a group, which repeats every c / gcd(cols, c) runs:
// those and the last run, which may be short, are all there is to see (one run at g = d_out,
// 32 at g = 2 and cols = 64; forward_plan is on every call's path).
int64_t worst_rows(const MixShape& s, bool router, int64_t cols) {
  if (!router) return s.r;
  const int64_t c = s.d_out / s.g, runs = (s.d_out + cols - 1) / cols;
  auto groups = [&](int64_t lo) { return (std::min(lo + cols, s.d_out) - 1) / c - lo / c + 1; };
  int64_t most = groups((runs - 1) * cols);
  for (int64_t k = 0, n = std::min(runs - 1, c / std::gcd(cols, c)); k < n; ++k)
    most = std::max(most, groups(k * cols));
  return s.r + s.N * most;
}

// A block's work in rows x K, the weights it reads (BM x this is its multiply-adds): phase 1's
// packed rows over its slice of d_in, then phase 2's tiles of B, N * r deep.
int64_t block_work(const MixShape& s, bool router, int64_t tiles_per_split, int cluster) {
  return worst_rows(s, router, cluster * tiles_per_split * BN) *
             ((s.d_in + cluster - 1) / cluster) +
         tiles_per_split * BN * s.N * s.r;
}

// Clusters of consecutive splits share phase 1 (forward_kernel): the largest size up to
// max_cluster (any size, not only powers of two: 63 splits take clusters of 7) that
// - divides the splits;
// - leaves d_in >= 128 per block, two 64-wide pieces on average (below that the barriers
//   would cost about what they save; not measured). The slices are whole pieces, so the last
//   blocks' may be short or empty;
// - cuts a block's phase 1 by at least a quarter: its packed rows over 1/cluster of d_in
//   (worst_rows of the cluster's columns) against a split's over all of it (x's reads, which
//   shrink by 1/cluster in any case, are left out). With narrow groups the blocks would sweep
//   each other's logits for little gain (decode at the defaults with g = d_out: 1040 rows per
//   block alone, 1032 in a cluster of 2, 1026 in one of 8), and the two cluster barriers per
//   64-wide piece of rows grow with them. At g = 2 and T = 8192 (2 splits, one group each) a
//   cluster of 2 sweeps 24 rows per block where a split swept 32: a quarter, and x is read
//   once. Without a router (external logits, or N == 1) the rows are A's r alone, which any
//   cluster divides: decode with g = d_out then takes clusters of 8, 16 rows over 1/8 of d_in
//   per block where a split swept all of A.
// 1: no cluster. Counts, not measurements.
int cluster_for(const MixShape& s, bool router, int64_t splits, int64_t tiles_per_split,
                int max_cluster) {
  const int64_t alone = worst_rows(s, router, tiles_per_split * BN);
  for (int cl = std::min(kMaxCluster, max_cluster); cl >= 2; --cl) {
    if (splits % cl == 0 && s.d_in >= 128 * int64_t(cl) &&
        4 * worst_rows(s, router, cl * tiles_per_split * BN) <= 3 * int64_t(cl) * alone)
      return cl;
  }
  return 1;
}

}  // namespace

ForwardPlan forward_plan(const MixShape& s, bool router, int num_sms, int max_cluster) {
  ForwardPlan plan{};
  plan.bm = s.T <= kSmallT ? 16 : 64;
  plan.row_blocks = (s.T + plan.bm - 1) / plan.bm;
  const int64_t tiles = (s.d_out + BN - 1) / BN;
  // Column splits only when the token blocks alone cannot fill the device (2 blocks per SM):
  // decode and short sequences. Each split recomputes h and its groups' logits, unless a
  // cluster shares them.
  const int64_t target = 2 * int64_t(std::max(num_sms, 1));
  const int64_t per_block = target / std::max<int64_t>(plan.row_blocks, 1);  // T = 0: 0 blocks
  const int64_t want = std::max<int64_t>(1, std::min(tiles, per_block));
  plan.tiles_per_split = (tiles + want - 1) / want;
  plan.splits = (tiles + plan.tiles_per_split - 1) / plan.tiles_per_split;
  plan.cluster = cluster_for(s, router, plan.splits, plan.tiles_per_split, max_cluster);
  // No cluster divides a prime number of splits above 8: 13 or 11 of 64 tiles at T = 1025-1472
  // on 132 SMs, 17 to 43 at wider d_out. When a plan has no cluster, fewer and longer splits
  // (down to half as many, so never another wave of blocks) may: the most of them that take
  // one are used if their blocks do less work than the plain splits' (block_work). At d = 4096
  // and the defaults, T = 1280 goes from 13 splits of 5 tiles (279K rows x K per block) to 10
  // of 7 in clusters of 5 (154K). Counts, not measurements.
  if (plan.cluster == 1 && max_cluster > 1) {
    const int64_t plain = block_work(s, router, plan.tiles_per_split, 1);
    for (int64_t fewer = plan.splits - 1, last = 0; 2 * fewer >= plan.splits; --fewer) {
      const int64_t tps = (tiles + fewer - 1) / fewer, splits = (tiles + tps - 1) / tps;
      if (tps == std::exchange(last, tps)) continue;  // the same splits as the last count
      const int cl = cluster_for(s, router, splits, tps, max_cluster);
      if (cl > 1 && block_work(s, router, tps, cl) < plain) {
        plan.tiles_per_split = tps;
        plan.splits = splits;
        plan.cluster = cl;
        break;
      }
    }
  }
  plan.ws_floats = (plan.splits - 1) * s.T * (s.r + s.N);
  return plan;
}

// A device that supports clusters may still be unable to schedule one (an MPS share of too few
// SMs): the launch then fails at once, before any work, with one of the two errors below (not
// sticky), and the forward runs without clusters (same outputs; ws does not depend on it).
template <typename T>
cudaError_t launch_forward(const ForwardArgs<T>& a, cudaStream_t stream) {
  if (a.plan.cluster > 1) {
    const cudaError_t err = launch_forward_clustered<T>(a, stream);
    if (err != cudaErrorInvalidClusterSize && err != cudaErrorLaunchOutOfResources) return err;
  }
  return a.plan.bm == 16 ? forward_bm<T, 16, false>(a, stream)
                         : forward_bm<T, 64, false>(a, stream);
}

#define MTLORA_INSTANTIATE_FORWARD(T) \
  template cudaError_t launch_forward<T>(const ForwardArgs<T>&, cudaStream_t);
MTLORA_INSTANTIATE_FORWARD(float)
MTLORA_INSTANTIATE_FORWARD(__half)
MTLORA_INSTANTIATE_FORWARD(__nv_bfloat16)

}  // namespace mtlora
