// Python bindings of mtlora_kernels._C: boundary checks, allocation and the one dtype dispatch;
// the launch sequence of the fused mix is mix.cpp's. The only file of the extension that sees
// torch.
// The kernels it launches are NOT verified on hardware (see mtlora.h).
#include <torch/extension.h>

// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE / cuBLAS headers, which a
// minimal toolkit (the one on the dev and CI machines) does not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "mtlora.h"
#include "philox.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_input(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                 const at::Device& device, const char* meaning) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but x is on ", device);
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, " (", meaning, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mtlora_kernels._C: launching ", what, " failed: ",
              cudaGetErrorString(err));
}

void check_launch(const mtlora::LaunchStatus& st) {
  if (st.err != cudaSuccess) check_cuda(st.err, st.kernel);
}

template <typename T>
struct Tag {
  using type = T;
};

// The one dtype dispatch of the extension: torch dtype -> the CUDA element type of the kernels.
template <typename F>
void dispatch_float_types(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default:
      TORCH_CHECK(false, "the CUDA backend supports float32, float16 and bfloat16 inputs, got ",
                  st, " (use backend='torch' for float64)");
  }
}

template <typename T>
const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mptr(Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
const T* cptr(const OptTensor& t) {
  return t.has_value() ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

// The SM count of a CUDA device: it decides the column splits of the forward and the dy kernel.
int multiprocessor_count(const at::Device& device) {
  int num_sms = 0;
  check_cuda(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device.index()),
             "cudaDeviceGetAttribute");
  return num_sms;
}

// The largest thread-block cluster the forward may use on a device (mtlora::forward_max_cluster,
// asked once per device), or 1 when MTLORA_CUDA_CLUSTERS=0: a switch for comparing the two
// paths on hardware, the cluster path being new (README, "What is verified").
int max_cluster(const at::Device& device) {
  const char* env = std::getenv("MTLORA_CUDA_CLUSTERS");
  if (env != nullptr && std::string(env) == "0") return 1;
  static std::mutex mu;
  static std::map<int, int> known;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(device.index());
  if (it != known.end()) return it->second;
  return known[device.index()] = mtlora::forward_max_cluster(device.index());
}

// Validates x, A, B (and the router) and returns the sizes.
mtlora::MixShape check_core(const Tensor& x, const Tensor& A, const Tensor& B,
                            const OptTensor& W, int64_t groups) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, "x must have shape [T, d_in], got ", x.sizes());
  TORCH_CHECK(A.dim() == 2, "lora_A must have shape [r, d_in], got ", A.sizes());
  TORCH_CHECK(B.dim() == 3, "lora_B must have shape [N, d_out, r], got ", B.sizes());
  mtlora::MixShape s{x.size(0), x.size(1), B.size(1), A.size(0), B.size(0), groups};
  TORCH_CHECK(s.r >= 1 && s.N >= 1 && s.d_out >= 1 && s.d_in >= 1,
              "need r, N, d_out, d_in >= 1; got lora_A ", A.sizes(), ", lora_B ", B.sizes());
  TORCH_CHECK(groups >= 1 && s.d_out % groups == 0, "groups must be a positive divisor of d_out=",
              s.d_out, ", got ", groups);
  TORCH_CHECK(std::max({s.d_in, s.d_out, s.r, s.g * s.N}) < mtlora::kMaxRowLength,
              "the CUDA backend needs d_in, d_out, r and groups*N below 2^26 (32-bit offsets "
              "within a tile), got d_in=", s.d_in, ", d_out=", s.d_out, ", r=", s.r,
              ", groups*N=", s.g * s.N);
  check_input(x, "x", {s.T, s.d_in}, x.scalar_type(), x.device(), "[T, d_in]");
  check_input(A, "lora_A", {s.r, s.d_in}, x.scalar_type(), x.device(), "[r, d_in]");
  check_input(B, "lora_B", {s.N, s.d_out, s.r}, x.scalar_type(), x.device(), "[N, d_out, r]");
  if (W.has_value())
    check_input(*W, "route_weight", {s.g * s.N, s.d_in}, x.scalar_type(), x.device(),
                "[g*N, d_in]");
  return s;
}

std::vector<Tensor> mix_forward(const Tensor& x, const Tensor& A, const Tensor& B,
                                const OptTensor& route_weight, const OptTensor& logits,
                                const OptTensor& residual, int64_t groups, double scaling,
                                double dropout_p, int64_t seed) {
  const mtlora::MixShape s = check_core(x, A, B, route_weight, groups);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              dropout_p);
  TORCH_CHECK(!(route_weight.has_value() && logits.has_value()),
              "give either route_weight or logits, not both");
  Tensor logits32;
  if (logits.has_value()) {
    TORCH_CHECK(logits->is_floating_point(), "logits must be floating, got ",
                logits->scalar_type());
    // Logits of any float dtype are promoted to fp32 before the softmax (SPEC section 3).
    logits32 = logits->to(at::kFloat).contiguous();
    check_input(logits32, "logits", {s.T, s.g * s.N}, at::kFloat, x.device(), "[T, g*N]");
  }
  if (residual.has_value())
    check_input(*residual, "residual", {s.T, s.d_out}, x.scalar_type(), x.device(),
                "[T, d_out]");

  const bool routed = route_weight.has_value() || logits.has_value();
  TORCH_CHECK(routed || s.N == 1, "lora_B holds ", s.N,
              " experts: give route_weight or logits (only N == 1 needs neither)");

  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty({s.T, s.d_out}, x.options());
  Tensor h = at::empty({s.T, s.r}, f32);
  Tensor pi = at::empty({s.T, s.g, s.N}, f32);
  const mtlora::ForwardPlan plan =
      mtlora::forward_plan(s, route_weight.has_value(), multiprocessor_count(x.device()),
                           max_cluster(x.device()));
  Tensor ws = at::empty({plan.ws_floats}, f32);
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const mtlora::ForwardArgs<T> args{
        cptr<T>(x), cptr<T>(A), cptr<T>(B), cptr<T>(route_weight),
        logits.has_value() ? cptr<float>(logits32) : nullptr, cptr<T>(residual), mptr<T>(y),
        mptr<float>(h), mptr<float>(pi), mptr<float>(ws), s, static_cast<float>(scaling),
        static_cast<float>(dropout_p), static_cast<uint64_t>(seed), plan};
    check_launch(mtlora::mix_forward<T>(args, c10::cuda::getCurrentCUDAStream()));
  });
  return {y, h, pi};
}

std::vector<Tensor> mix_backward(const Tensor& dy, const Tensor& x, const Tensor& A,
                                 const Tensor& B, const OptTensor& route_weight, const Tensor& h,
                                 const Tensor& pi, const OptTensor& dpi, int64_t groups,
                                 double scaling, double dropout_p, int64_t seed) {
  const mtlora::MixShape s = check_core(x, A, B, route_weight, groups);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              dropout_p);
  check_input(dy, "dy", {s.T, s.d_out}, x.scalar_type(), x.device(), "[T, d_out]");
  check_input(h, "h", {s.T, s.r}, at::kFloat, x.device(), "[T, r] fp32 from the forward");
  check_input(pi, "pi", {s.T, s.g, s.N}, at::kFloat, x.device(), "[T, g, N] fp32");
  if (dpi.has_value())
    check_input(*dpi, "dpi", {s.T, s.g, s.N}, at::kFloat, x.device(), "[T, g, N] fp32");

  const c10::cuda::CUDAGuard guard(x.device());
  const bool routed = route_weight.has_value();
  const mtlora::BackwardPlan plan =
      mtlora::backward_plan(s, routed, multiprocessor_count(x.device()));
  // Below 2^26 (check_core) a launch can still pass CUDA's grid limit, which would fail as a
  // bare "invalid configuration argument".
  TORCH_CHECK(s.T == 0 || plan.grid_y <= mtlora::kMaxGridY,  // T == 0 launches no kernel
              "the CUDA backward launches at most ", mtlora::kMaxGridY,
              " blocks along a grid's y; d_in=", s.d_in, ", r=", s.r, ", N=", s.N,
              ", groups*N=", s.g * s.N, (routed ? " with" : " without"), " a router need ",
              plan.grid_y, " (dx: ceil(d_in/64), dA and dW: ceil(r/64) + ceil(groups*N/64) "
              "with a router, dB: ceil(r/64) * ceil(N / max(1, floor(64/r))))");
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty_like(x);
  Tensor dA = at::empty_like(A);
  Tensor dB = at::empty_like(B);
  Tensor dW = routed ? at::empty_like(*route_weight) : at::empty({0}, x.options());
  Tensor dz = at::empty({s.T, s.g * s.N}, f32);
  Tensor dh = at::empty({s.T, s.r}, f32);  // workspaces of the sequence
  Tensor dpi_ws = at::empty({s.T, s.g, s.N}, f32);
  Tensor ws = at::empty({plan.ws_floats}, f32);
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const mtlora::BackwardArgs<T> args{
        cptr<T>(dy), cptr<T>(x), cptr<T>(A), cptr<T>(B), cptr<T>(route_weight), cptr<float>(h),
        cptr<float>(pi), cptr<float>(dpi), mptr<T>(dx), mptr<T>(dA), mptr<T>(dB),
        routed ? mptr<T>(dW) : nullptr, mptr<float>(dz), mptr<float>(dh), mptr<float>(dpi_ws),
        mptr<float>(ws), s, static_cast<float>(scaling), static_cast<float>(dropout_p),
        static_cast<uint64_t>(seed), plan};
    check_launch(mtlora::mix_backward<T>(args, c10::cuda::getCurrentCUDAStream()));
  });
  return {dx, dA, dB, dW, dz};
}

// The keep-mask of the kernels for (seed, T, d_in, p). On a CUDA device it runs the kernel;
// on the CPU it evaluates the same Philox function (philox.h) on the host, which lets the mask
// be checked on machines without a GPU.
Tensor dropout_keep_mask(int64_t seed, int64_t T, int64_t d_in, double dropout_p,
                         const at::Device& device) {
  TORCH_CHECK(T >= 0 && d_in >= 0, "T and d_in must be >= 0, got ", T, ", ", d_in);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              dropout_p);
  const auto p = static_cast<float>(dropout_p);
  const auto sd = static_cast<uint64_t>(seed);
  Tensor keep = at::empty({T, d_in}, at::TensorOptions().dtype(at::kBool).device(device));
  if (T * d_in == 0) return keep;
  if (device.is_cpu()) {
    bool* out = keep.data_ptr<bool>();
    at::parallel_for(0, T * d_in, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) out[o] = mtlora::dropout_uniform(sd, o) >= p;
    });
    return keep;
  }
  TORCH_CHECK(device.is_cuda(), "dropout_keep_mask: device must be cpu or cuda, got ", device);
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(mtlora::launch_dropout_keep_mask(keep.data_ptr<bool>(), T, d_in, p, sd,
                                              c10::cuda::getCurrentCUDAStream()),
             "dropout_keep_mask_kernel");
  return keep;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mtlora_kernels._C: fused CUDA kernels of the mtLoRA mix (unverified on hardware)";
  m.def("forward", &mix_forward, "fused mix forward -> (y, h, pi)", py::arg("x"), py::arg("A"),
        py::arg("B"), py::arg("route_weight"), py::arg("logits"), py::arg("residual"),
        py::arg("groups"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"));
  m.def("backward", &mix_backward, "fused mix backward -> (dx, dA, dB, dW_route, dlogits)",
        py::arg("dy"), py::arg("x"), py::arg("A"), py::arg("B"), py::arg("route_weight"),
        py::arg("h"), py::arg("pi"), py::arg("dpi"), py::arg("groups"), py::arg("scaling"),
        py::arg("dropout_p"), py::arg("seed"));
  m.def("dropout_keep_mask", &dropout_keep_mask, "the kernels' dropout keep-mask [T, d_in]",
        py::arg("seed"), py::arg("T"), py::arg("d_in"), py::arg("dropout_p"), py::arg("device"));
  m.def(
      "forward_max_cluster",
      [](int64_t index) {
        const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
        const c10::cuda::CUDAGuard guard(device);  // the device whose kernels are asked about
        return max_cluster(device);
      },
      "the largest thread-block cluster the forward launches on a CUDA device (1: none, as "
      "without sm_90 device code or with MTLORA_CUDA_CLUSTERS=0)",
      py::arg("device_index"));
  // Build facts, read by mtlora_kernels._build_info.build_info().
  m.attr("cuda_version") = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string(CUDART_VERSION % 1000 / 10);
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
  m.attr("arch_list") = std::string(mtlora::compiled_arch_list());
}
