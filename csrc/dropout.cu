// The dropout keep-mask the kernels draw (for tests and debugging), and the build's arch list.
// NOT verified on hardware; the host twin of the same function (philox.h) is tested on the CPU.
#include "common.cuh"
#include "mtlora.h"

namespace mtlora {
namespace {

__global__ void dropout_keep_mask_kernel(bool* keep, int64_t T, int64_t d_in, float p,
                                         uint64_t seed) {
  const int64_t n = T * d_in;
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < n;
       o += int64_t(gridDim.x) * blockDim.x)
    keep[o] = dropout_uniform(seed, o) >= p;
}

}  // namespace

cudaError_t launch_dropout_keep_mask(bool* keep, int64_t T, int64_t d_in, float p, uint64_t seed,
                                     cudaStream_t stream) {
  const int64_t n = T * d_in;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535));
  dropout_keep_mask_kernel<<<blocks, 256, 0, stream>>>(keep, T, d_in, p, seed);
  return cudaGetLastError();
}

#define MTLORA_STR2(...) #__VA_ARGS__
#define MTLORA_STR(...) MTLORA_STR2(__VA_ARGS__)  // variadic: the list has commas
const char* compiled_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return MTLORA_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace mtlora
