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
  // - spans at most one group's width of columns, so the shared sweeps cover at most two
  //   groups' logits, as one split's may (with many narrow groups each block would sweep the
  //   others' logits as well).
  plan.cluster = 1;
  for (int cl = std::min(kMaxCluster, max_cluster); cl >= 2; --cl) {
    if (plan.splits % cl == 0 && s.d_in >= 128 * int64_t(cl) &&
        cl * plan.tiles_per_split * BN <= s.d_out / s.g) {
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
