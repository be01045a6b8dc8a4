// The launch sequence of one fused mix call, forward and backward (mtlora.h). Host code with no
// torch header: bindings.cpp runs it on a GPU, and tests/cuda_emu compiles it with the kernels
// for a CPU emulator of CUDA's execution model.
#include <cstdint>

#include "mtlora.h"

namespace mtlora {

#define MTLORA_LAUNCH(call, name)                              \
  do {                                                         \
    const cudaError_t err_ = (call);                           \
    if (err_ != cudaSuccess) return LaunchStatus{err_, name};  \
  } while (0)

template <typename T>
LaunchStatus mix_forward(const ForwardArgs<T>& a, cudaStream_t stream) {
  const MixShape& s = a.s;
  if (s.T == 0) return {cudaSuccess, nullptr};
  MTLORA_LAUNCH(launch_forward<T>(a, stream), "forward_kernel");
  return {cudaSuccess, nullptr};
}

template <typename T>
LaunchStatus mix_backward(const BackwardArgs<T>& a, cudaStream_t stream) {
  const MixShape& s = a.s;
  if (s.T == 0) {  // no token: the weight gradients are zero, the rest is empty
    MTLORA_LAUNCH(cudaMemsetAsync(a.dA, 0, sizeof(T) * s.r * s.d_in, stream), "memset dA");
    MTLORA_LAUNCH(cudaMemsetAsync(a.dB, 0, sizeof(T) * s.N * s.d_out * s.r, stream), "memset dB");
    if (a.dW != nullptr)
      MTLORA_LAUNCH(cudaMemsetAsync(a.dW, 0, sizeof(T) * s.g * s.N * s.d_in, stream), "memset dW");
    return {cudaSuccess, nullptr};
  }
  const bool routed = a.W != nullptr;
  const BackwardPlan& plan = a.plan;
  MTLORA_LAUNCH(launch_backward_dy<T>(a.dy, a.h, a.pi, a.B, a.dh_ws, a.dpi_ws, a.ws, plan.dy, s,
                                      a.scaling, stream),
                "backward_dy_kernel");
  MTLORA_LAUNCH(launch_softmax_backward(a.pi, a.dpi_ws, a.dpi, a.dz, s.T * s.g, s.N, stream),
                "softmax_backward_kernel");
  MTLORA_LAUNCH(launch_backward_dB<T>(a.dy, a.h, a.pi, a.dB, a.ws, plan.db, s, a.scaling, stream),
                "backward_db_kernel");
  MTLORA_LAUNCH(launch_backward_dAW<T>(a.x, a.dh_ws, routed ? a.dz : nullptr, a.dA,
                                       routed ? a.dW : nullptr, a.ws, plan.daw, s, a.dropout_p,
                                       a.seed, stream),
                "backward_daw_kernel");
  MTLORA_LAUNCH(launch_backward_dx<T>(a.dh_ws, routed ? a.dz : nullptr, a.A, a.W, a.dx, s,
                                      a.dropout_p, a.seed, stream),
                "backward_dx_kernel");
  return {cudaSuccess, nullptr};
}

#undef MTLORA_LAUNCH

#define MTLORA_INSTANTIATE_MIX(T)                                                 \
  template LaunchStatus mix_forward<T>(const ForwardArgs<T>&, cudaStream_t);     \
  template LaunchStatus mix_backward<T>(const BackwardArgs<T>&, cudaStream_t);
MTLORA_INSTANTIATE_MIX(float)
MTLORA_INSTANTIATE_MIX(__half)
MTLORA_INSTANTIATE_MIX(__nv_bfloat16)

}  // namespace mtlora
