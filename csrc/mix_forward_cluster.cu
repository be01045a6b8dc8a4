// Forward of the fused mix with thread-block clusters (sm_90): the cluster instantiations of
// forward_kernel (mix_forward.cuh), in their own translation unit so that they compile in
// parallel with the others, and the query of whether a device and its binary can run them.
// NOT verified on hardware (emulated on the CPU only); see mtlora.h.
#include "mix_forward.cuh"

namespace mtlora {

template <typename T>
cudaError_t launch_forward_clustered(const ForwardArgs<T>& a, cudaStream_t stream) {
  return a.plan.bm == 16 ? forward_bm<T, 16, true>(a, stream) : forward_bm<T, 64, true>(a, stream);
}

template cudaError_t launch_forward_clustered<float>(const ForwardArgs<float>&, cudaStream_t);
template cudaError_t launch_forward_clustered<__half>(const ForwardArgs<__half>&, cudaStream_t);
template cudaError_t launch_forward_clustered<__nv_bfloat16>(const ForwardArgs<__nv_bfloat16>&,
                                                             cudaStream_t);

int forward_max_cluster(int device) {
  int cluster_launch = 0;
  cudaFuncAttributes attr{};
  if (cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device) != cudaSuccess ||
      cudaFuncGetAttributes(&attr, forward_kernel<__half, 16, true>) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: cleared, so that no later launch check reports it
    return 1;
  }
  // ptxVersion: the architecture the device code was compiled for (__CUDA_ARCH__); an sm_80
  // binary JIT-compiled for an sm_90 GPU has none of the cluster path.
  return cluster_launch != 0 && attr.ptxVersion >= 90 && attr.binaryVersion >= 90 ? kMaxCluster
                                                                                   : 1;
}

}  // namespace mtlora
