// C entry points of the emulated extension, called through ctypes by tests/cuda_emu/__init__.py:
// the emulated device's settings, the plans, and the launch sequence without bindings.cpp (on
// buffers that __init__.py allocates, NaN until written). dtype: 0 = fp32, 1 = fp16, 2 = bf16.
// The launch entries return 0, or write the failed kernel and the error into err and return 1.
#include <cstdio>

#include "mtlora.h"

namespace {

template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(static_cast<float*>(nullptr));
    case 1: return f(static_cast<__half*>(nullptr));
    case 2: return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return -1;
}

int report(const mtlora::LaunchStatus& st, char* err, int errlen) {
  if (st.err == cudaSuccess) return 0;
  std::snprintf(err, errlen, "launching %s failed: %s", st.kernel, cudaGetErrorString(st.err));
  return 1;
}

}  // namespace

// out: the forward's workspace in floats and its cluster size.
extern "C" void emu_forward_plan(const int64_t* shape, int router, int num_sms, int max_cluster,
                                 int64_t* out) {
  const mtlora::MixShape s{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]};
  const mtlora::ForwardPlan plan = mtlora::forward_plan(s, router != 0, num_sms, max_cluster);
  out[0] = plan.ws_floats;
  out[1] = plan.cluster;
}

// forward_max_cluster on an emulated device with (1) or without (0) cluster launch, whose
// kernels were compiled from PTX for compute_<ptx> into machine code for sm_<binary> (the
// emulator's answers to the two queries).
extern "C" int emu_forward_max_cluster(int cluster_launch, int ptx, int binary) {
  emu::device_cluster_launch = cluster_launch;
  emu::ptx_arch = ptx;
  emu::binary_arch = binary;
  const int max_cluster = mtlora::forward_max_cluster(0);
  emu::device_cluster_launch = 1;
  emu::ptx_arch = emu::binary_arch = 90;
  return max_cluster;
}

// The SM count the emulated device reports (cudaDevAttrMultiProcessorCount), which bindings.cpp
// plans with.
extern "C" void emu_set_multiprocessor_count(int n) { emu::multiprocessor_count = n; }

// How many cluster launches ran so far.
extern "C" uint64_t emu_cluster_launches() { return emu::cluster_launches; }

// Whether every cluster launch fails, as on a GPU that cannot schedule one.
extern "C" void emu_refuse_clusters(int refuse) { emu::refuse_clusters = refuse != 0; }
// Whether launches run their blocks in reverse index order.
extern "C" void emu_reverse_blocks(int reverse) { emu::reverse_blocks = reverse != 0; }

// Windows (emu.h): launches of `kernel` skip their blocks below (x, y, z) and zero `bytes` at
// `zero` first (if not null); emu_clear_windows() ends them all.
extern "C" void emu_set_window(const char* kernel, unsigned x, unsigned y, unsigned z,
                               void* zero, size_t bytes) {
  emu::first_block[kernel] = dim3(x, y, z);
  if (zero != nullptr) emu::zero_before[kernel] = {zero, bytes};
}
extern "C" void emu_clear_windows() {
  emu::first_block.clear();
  emu::zero_before.clear();
}

// out: the column splits of the dy kernel, the token splits of dB and of dA/dW, and the
// workspace in floats.
extern "C" void emu_backward_plan(const int64_t* shape, int routed, int num_sms, int64_t* out) {
  const mtlora::MixShape s{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]};
  const mtlora::BackwardPlan plan = mtlora::backward_plan(s, routed != 0, num_sms);
  out[0] = plan.dy.splits;
  out[1] = plan.db.splits;
  out[2] = plan.daw.splits;
  out[3] = plan.ws_floats;
}

extern "C" int emu_mix_forward(int dtype, const void* x, const void* A, const void* B,
                               const void* W, const float* logits, const void* residual, void* y,
                               float* h, float* pi, float* ws, const int64_t* shape,
                               float scaling, float dropout_p, uint64_t seed, int num_sms,
                               int max_cluster, char* err, int errlen) {
  const mtlora::MixShape s{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]};
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const mtlora::ForwardArgs<T> a{
        static_cast<const T*>(x), static_cast<const T*>(A), static_cast<const T*>(B),
        static_cast<const T*>(W), logits, static_cast<const T*>(residual), static_cast<T*>(y),
        h, pi, ws, s, scaling, dropout_p, seed,
        mtlora::forward_plan(s, W != nullptr, num_sms, max_cluster)};
    return report(mtlora::mix_forward<T>(a, nullptr), err, errlen);
  });
}

extern "C" int emu_mix_backward(int dtype, const void* dy, const void* x, const void* A,
                                const void* B, const void* W, const float* h, const float* pi,
                                const float* dpi, void* dx, void* dA, void* dB, void* dW,
                                float* dz, float* dh_ws, float* dpi_ws, float* ws,
                                const int64_t* shape,
                                float scaling, float dropout_p, uint64_t seed, int num_sms,
                                char* err, int errlen) {
  const mtlora::MixShape s{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]};
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const mtlora::BackwardArgs<T> a{
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(A),
        static_cast<const T*>(B), static_cast<const T*>(W), h, pi, dpi, static_cast<T*>(dx),
        static_cast<T*>(dA), static_cast<T*>(dB), static_cast<T*>(dW), dz, dh_ws, dpi_ws, ws, s,
        scaling, dropout_p, seed, mtlora::backward_plan(s, W != nullptr, num_sms)};
    return report(mtlora::mix_backward<T>(a, nullptr), err, errlen);
  });
}

extern "C" int emu_dropout_keep_mask(bool* keep, int64_t T, int64_t d_in, float p, uint64_t seed,
                                     char* err, int errlen) {
  return report({mtlora::launch_dropout_keep_mask(keep, T, d_in, p, seed, nullptr),
                 "dropout_keep_mask_kernel"},
                err, errlen);
}
