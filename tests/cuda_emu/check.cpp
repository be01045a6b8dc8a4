// Sanitizer driver of the emulated extension (tests/test_cuda_emulated.py builds it twice: with
// AddressSanitizer + UndefinedBehaviorSanitizer, and with ThreadSanitizer). Runs the forward and
// backward launch sequences of csrc/mix.cpp over shapes that reach every kernel path, with every
// buffer its own heap allocation of exactly its size, so any access past a tensor, any misaligned
// 16-byte vector access and any shared-memory race is reported. Prints one line per case;
// correctness against the reference is the Python tests' job.
#include <cstdio>
#include <random>
#include <vector>

#include "mtlora.h"

namespace {

struct Case {
  int64_t T, d_in, d_out, r, N, g;
  int router;  // 0: none (N == 1), 1: route_weight, 2: external logits
  float p;
  int num_sms;
  int max_cluster = 8;  // an sm_90 device (clusters where the forward's plan takes them)
};

template <typename T>
std::vector<T> random_vec(int64_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<T> v(static_cast<size_t>(n));
  for (auto& e : v) {
    const float f = d(rng);
    if constexpr (std::is_same_v<T, float>) {
      e = f;
    } else if constexpr (std::is_same_v<T, __half>) {
      e = __float2half_rn(f);
    } else {
      e = __float2bfloat16_rn(f);
    }
  }
  return v;
}

template <typename T>
int run(const Case& c, std::mt19937& rng) {
  const mtlora::MixShape s{c.T, c.d_in, c.d_out, c.r, c.N, c.g};
  auto x = random_vec<T>(c.T * c.d_in, rng, 1.f);
  auto A = random_vec<T>(c.r * c.d_in, rng, 0.2f);
  auto B = random_vec<T>(c.N * c.d_out * c.r, rng, 0.3f);
  auto W = random_vec<T>(c.router == 1 ? c.g * c.N * c.d_in : 0, rng, 0.2f);
  auto logits = random_vec<float>(c.router == 2 ? c.T * c.g * c.N : 0, rng, 1.f);
  auto residual = random_vec<T>(c.T * c.d_out, rng, 1.f);
  std::vector<T> y(c.T * c.d_out);
  std::vector<float> h(c.T * c.r), pi(c.T * c.g * c.N);
  const mtlora::ForwardPlan fplan =
      mtlora::forward_plan(s, c.router == 1, c.num_sms, c.max_cluster);
  std::vector<float> ws(fplan.ws_floats);
  const mtlora::ForwardArgs<T> fa{x.data(), A.data(), B.data(), c.router == 1 ? W.data() : nullptr,
                                  c.router == 2 ? logits.data() : nullptr, residual.data(),
                                  y.data(), h.data(), pi.data(), ws.data(), s, 2.f, c.p, 1234,
                                  fplan};
  mtlora::LaunchStatus st = mtlora::mix_forward<T>(fa, nullptr);
  if (st.err != cudaSuccess) {
    std::printf("forward: %s failed\n", st.kernel);
    return 1;
  }
  auto dy = random_vec<T>(c.T * c.d_out, rng, 1.f);
  auto dpi = random_vec<float>(c.T * c.g * c.N, rng, 1.f);
  std::vector<T> dx(c.T * c.d_in), dA(A.size()), dB(B.size()), dW(W.size());
  std::vector<float> dz(c.T * c.g * c.N), dh_ws(c.T * c.r), dpi_ws(c.T * c.g * c.N);
  const mtlora::BackwardPlan bplan = mtlora::backward_plan(s, c.router == 1, c.num_sms);
  std::vector<float> bws(bplan.ws_floats);
  const mtlora::BackwardArgs<T> ba{
      dy.data(), x.data(), A.data(), B.data(), c.router == 1 ? W.data() : nullptr, h.data(),
      pi.data(), c.router != 0 ? dpi.data() : nullptr, dx.data(), dA.data(), dB.data(),
      c.router == 1 ? dW.data() : nullptr, dz.data(), dh_ws.data(), dpi_ws.data(), bws.data(),
      s, 2.f, c.p, 1234, bplan};
  st = mtlora::mix_backward<T>(ba, nullptr);
  if (st.err != cudaSuccess) {
    std::printf("backward: %s failed\n", st.kernel);
    return 1;
  }
  return 0;
}

}  // namespace

int main() {
  // Odd sizes (scalar edges everywhere), aligned sizes (16-byte vector paths, the folded mix),
  // g = d_out (per-expert epilogue), decode (16-row tiles), r > 64 (two rank chunks), the column
  // splits of the dy kernel (slabs) and the same shape without them, external logits, plain
  // LoRA, the forward's column splits (num_sms = 1) with groups that span two splits, a group
  // that starts off a 16-byte vector of dy, clusters of 4, 3 and 2 splits sharing the
  // forward's projection (with dropout, and with external logits; one of 4 over 16 groups of
  // 16 columns, the per-expert epilogue). In 16-bit the forward's
  // sweeps over x run the cp.async pipeline, x through registers with dropout and through the
  // pipeline without (the router's sweep), as do phase 2's B tiles; two cases have more K-chunks
  // than stages.
  const Case cases[] = {
      {7, 37, 30, 5, 3, 3, 1, 0.1f, 132},
      {70, 64, 128, 16, 4, 2, 1, 0.1f, 132},  // dy kernel: 2 column splits
      {70, 192, 128, 16, 8, 2, 1, 0.1f, 1},   // dy kernel: no split; forward: 6 + 4 chunks
      {20, 64, 64, 16, 2, 64, 2, 0.0f, 132},
      {3, 512, 128, 32, 16, 2, 1, 0.1f, 132},  // decode: 8 chunks of x and of B (6 stages)
      {17, 40, 24, 80, 2, 2, 1, 0.05f, 132},
      {5, 24, 16, 3, 1, 1, 0, 0.1f, 132},
      {17, 64, 192, 16, 4, 2, 1, 0.1f, 1},  // forward: 2 splits, group 1 in both
      {17, 64, 256, 16, 4, 16, 2, 0.0f, 1},
      {1, 40, 24, 8, 4, 2, 2, 0.0f, 132},  // dy kernel: group 1 starts off a 16 B vector
      {3, 512, 256, 16, 4, 1, 1, 0.1f, 132},   // forward: a cluster of 4 splits
      {20, 328, 256, 16, 4, 2, 2, 0.0f, 132},  // forward: clusters of 2, a partial last slice
      {3, 768, 192, 16, 4, 1, 1, 0.1f, 132},   // forward: a cluster of 3
      {3, 512, 256, 16, 4, 16, 1, 0.1f, 132},  // forward: a cluster of 4 over 16 groups
      {3, 512, 256, 16, 4, 256, 2, 0.1f, 132},  // external logits, g = d_out: a cluster of 4
  };
  // Up to four blocks of every launch without clusters run at once (emu.h), so a race between
  // blocks on global memory is a TSan report too (between blocks that run at once).
  emu::concurrent_blocks = 4;
  std::mt19937 rng(0);
  int failures = 0;
  for (const Case& c : cases) {
    for (int dtype = 0; dtype < 3; ++dtype) {
      const int rc = dtype == 0   ? run<float>(c, rng)
                     : dtype == 1 ? run<__half>(c, rng)
                                  : run<__nv_bfloat16>(c, rng);
      std::printf("T=%ld d_in=%ld d_out=%ld r=%ld N=%ld g=%ld router=%d p=%g sms=%d dtype=%d: %s\n",
                  long(c.T), long(c.d_in), long(c.d_out), long(c.r), long(c.N), long(c.g),
                  c.router, c.p, c.num_sms, dtype, rc == 0 ? "ok" : "FAILED");
      failures += rc;
    }
  }
  return failures == 0 ? 0 : 1;
}
