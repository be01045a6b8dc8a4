// Forward of the fused mix: the plan of a launch and its launch without clusters (the kernel is
// in mix_forward.cuh; launches with clusters are mix_forward_cluster.cu's).
// NOT verified on hardware (emulated on the CPU only); see mtlora.h.
#include "mix_forward.cuh"

namespace mtlora {

ForwardPlan forward_plan(const MixShape& s, int num_sms, int max_cluster) {
  ForwardPlan plan{};
  plan.bm = s.T <= kSmallT ? 16 : 64;
  plan.row_blocks = (s.T + plan.bm - 1) / plan.bm;
  const int64_t tiles = (s.d_out + BN - 1) / BN;
  // Column splits only when the token blocks alone cannot fill the device (2 blocks per SM):
  // decode and short sequences. Each split recomputes h and its groups' logits.
  const int64_t target = 2 * int64_t(std::max(num_sms, 1));
  const int64_t per_block = target / std::max<int64_t>(plan.row_blocks, 1);  // T = 0: 0 blocks
  const int64_t want = std::max<int64_t>(1, std::min(tiles, per_block));
  plan.tiles_per_split = (tiles + want - 1) / want;
  plan.splits = (tiles + plan.tiles_per_split - 1) / plan.tiles_per_split;
  plan.ws_floats = (plan.splits - 1) * s.T * (s.r + s.N);
  // Clusters of consecutive splits share phase 1 (forward_kernel): the largest size up to
  // max_cluster (any size, not only powers of two: 63 splits take clusters of 7) that
  // - divides the splits;
  // - leaves d_in >= 128 per block, two 64-wide pieces on average (below that the barriers
  //   would cost about what they save; not measured). The slices are whole pieces, so the last
  //   blocks' may be short or empty;
  // - cuts a block's phase 1 by at least a quarter. A block sweeps the packed rows of A and of
  //   the router rows of the groups it touches: r + N * (groups of its split) rows over all of
  //   d_in alone, r + N * (groups of all the cluster's splits) rows over 1/cluster of d_in in a
  //   cluster (the worst block of either launch, in rows x d_in; x's reads, which shrink by
  //   1/cluster in any case, are left out). With narrow groups the blocks would sweep each
  //   other's logits for little gain (decode at the defaults with g = d_out: 1040 rows per
  //   block alone, 1032 in a cluster of 2, 1026 in one of 8), and the two cluster barriers per
  //   64-wide piece of rows grow with them. At g = 2 and T = 8192 (2 splits, one group each) a
  //   cluster of 2 sweeps 24 rows per block where a split swept 32: a quarter, and x is read
  //   once. Counts, not measurements.
  const int64_t c = std::max<int64_t>(s.d_out / std::max<int64_t>(s.g, 1), 1);
  auto worst_rows = [&](int64_t cols) {  // most packed rows of one run of `cols` columns
    int64_t groups = 0;
    for (int64_t lo = 0; lo < s.d_out; lo += cols)
      groups = std::max(groups, (std::min(lo + cols, s.d_out) - 1) / c - lo / c + 1);
    return s.r + s.N * groups;
  };
  const int64_t split_cols = plan.tiles_per_split * BN;
  plan.cluster = 1;
  for (int cl = std::min(kMaxCluster, max_cluster); cl >= 2 && s.d_out > 0; --cl) {
    if (plan.splits % cl == 0 && s.d_in >= 128 * int64_t(cl) &&
        4 * worst_rows(cl * split_cols) <= 3 * int64_t(cl) * worst_rows(split_cols)) {
      plan.cluster = cl;
      break;
    }
  }
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
