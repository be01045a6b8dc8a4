// Launch wrappers of the fused mtLoRA mix kernels: raw pointers, sizes and a stream in, a
// cudaError_t out. No torch header may be included here or in any .cu (SPEC section 6: a .cu
// that includes torch/extension.h took ~2 min per architecture to compile on 2 cores);
// bindings.cpp is the only torch-aware file and does the checks and the dtype dispatch.
//
// Layouts (all row-major, contiguous): x [T, d_in]; A [r, d_in]; B [N, d_out, r];
// W (the router) [g*N, d_in]; h [T, r] fp32; z / pi / dpi [T, g, N] fp32; y, dy [T, d_out].
// Templates are instantiated for float, __half and __nv_bfloat16 (fp32 accumulation).
//
// STATUS: these kernels compile for sm_80 and sm_90, and they run (with the launch sequence of
// mix.cpp) in the CPU emulator of tests/cuda_emu, where tests/test_cuda_mix.py checks them
// against the reference and tests/test_cuda_emulated.py under ASan, UBSan and TSan. They have
// NOT been run on a GPU (none was available while they were written); the same tests run them
// there wherever a GPU exists.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace mtlora {

// Sizes of one mix call. Everything is int64 so that offsets like t * d_out never overflow
// (T * d_out > 2^31 happens at T = 512k tokens, d = 4096).
struct MixShape {
  int64_t T, d_in, d_out, r, N, g;
};

// The kernels address within one staged K-chunk with 32-bit offsets (ColLoader in
// common.cuh, which static_asserts that its chunk's rows fit), so d_in, d_out, r and g*N must
// stay below this; bindings.cpp refuses larger shapes.
constexpr int64_t kMaxRowLength = int64_t(1) << 26;
// CUDA's limit on a grid's y (and z): the backward's launches reach it below kMaxRowLength
// (BackwardPlan::grid_y), and bindings.cpp refuses those shapes.
constexpr int64_t kMaxGridY = 65535;

// ---- forward --------------------------------------------------------------------------------
// One launch (mix_forward.cu): per block of tokens, h = drop(x) . A^T and z = x . W^T (fp32),
// pi = per-group softmax of z (or of external logits, or uniform), then
// y = residual + scaling * sum_e pi[:, G(j), e] * (h . B_e^T)[:, j]   (residual may be null).
// The grid is (token blocks) x (column splits of d_out); a split > 0 keeps its own h and its
// first group's pi in a workspace of ws_floats floats. On sm_90, clusters of consecutive
// splits share the projection (h and the logits) over distributed shared memory.
struct ForwardPlan {
  int bm;                   // rows per token block: 16 (decode, T <= 16) or 64
  int64_t row_blocks;       // ceil(T / bm)
  int64_t splits;           // column splits of d_out
  int64_t tiles_per_split;  // 64-wide output tiles per split
  int64_t ws_floats;        // workspace the launch needs
  int cluster;              // splits per thread-block cluster (1: no cluster)
};
// router: W is given (its rows are swept with A's; external logits are only read).
// max_cluster: forward_max_cluster(device), or 1 for no clusters.
ForwardPlan forward_plan(const MixShape& s, bool router, int num_sms, int max_cluster);
// The largest cluster the forward may launch on `device` with the binary that runs there: 8
// when the device supports cluster launch and the kernels were compiled for sm_90+, else 1.
int forward_max_cluster(int device);

// ---- backward -------------------------------------------------------------------------------
// Reductions that would leave SMs idle are split over several blocks, each writing fp32
// partial sums to its own slab of a workspace, and a second kernel adds the slabs in split
// order (reduce_splits_kernel in common.cuh). No atomics anywhere: every backward output is
// deterministic in every mode (the splits are a function of the shape and the SM count only).

// The dy kernel's column splits of d_out (runs of `cols` columns, a multiple of 64), taken when
// its token tiles alone cannot give the device 2 blocks per SM.
struct ColumnSplits {
  int64_t splits;  // 1: the kernel writes dh and dpi itself, no workspace
  int64_t cols;
};
ColumnSplits dy_column_splits(const MixShape& s, int num_sms);
// dh[t, k] = s * sum_{j, e} dy[t, j] pi[t, G(j), e] B[e, j, k]
// dpi[t, G, e] = s * sum_{j in G} dy[t, j] (h . B_e^T)[t, j]
// (ws: splits * T * (r + g*N) floats: slab q holds split q's dh [T, r], then its dpi [T, g*N])
template <typename T>
cudaError_t launch_backward_dy(const T* dy, const float* h, const float* pi, const T* B, float* dh,
                               float* dpi, float* ws, const ColumnSplits& split,
                               const MixShape& s, float scaling, cudaStream_t stream);
// dz = pi * (dpi + dpi_extra - sum_e pi * (dpi + dpi_extra)) per [rows, N] row (extra may be null).
cudaError_t launch_softmax_backward(const float* pi, const float* dpi, const float* dpi_extra,
                                    float* dz, int64_t rows, int64_t N, cudaStream_t stream);
// dB and dA / dW reduce over the tokens. When their output tiles alone cannot fill the device
// (4 blocks per SM, their occupancy), the tokens are split into runs of whole 64-token chunks.
struct TokenSplits {
  int64_t splits;            // 1: the GEMM kernel writes the output itself, no workspace
  int64_t tokens_per_split;  // a multiple of 64
};
// The splits of one backward call. The dy, dB and dA / dW launches run in turn (dy's slabs are
// reduced before dB starts), so they share one workspace of the largest size.
struct BackwardPlan {
  ColumnSplits dy;
  TokenSplits db, daw;
  int64_t ws_floats;
  int64_t grid_y;  // the most blocks along y of its launches (at most kMaxGridY to launch)
};
BackwardPlan backward_plan(const MixShape& s, bool routed, int num_sms);
// dB[e, j, k] = s * sum_t pi[t, G(j), e] dy[t, j] h[t, k]   (ws: splits * N * d_out * r floats)
template <typename T>
cudaError_t launch_backward_dB(const T* dy, const float* h, const float* pi, T* dB, float* ws,
                               const TokenSplits& split, const MixShape& s, float scaling,
                               cudaStream_t stream);
// dA = dh^T . drop(x);  dW = dz^T . x  (dz, dW null when there is no router)
// (ws: splits * (r + g*N) * d_in floats, or splits * r * d_in without a router)
template <typename T>
cudaError_t launch_backward_dAW(const T* x, const float* dh, const float* dz, T* dA, T* dW,
                                float* ws, const TokenSplits& split, const MixShape& s,
                                float dropout_p, uint64_t seed, cudaStream_t stream);
// dx = keep / (1 - p) * (dh . A) + dz . W  (dz, W null when there is no router)
template <typename T>
cudaError_t launch_backward_dx(const float* dh, const float* dz, const T* A, const T* W, T* dx,
                               const MixShape& s, float dropout_p, uint64_t seed,
                               cudaStream_t stream);

// ---- one whole call: the launch sequence (mix.cpp) ----------------------------------------
// bindings.cpp validates and allocates, then runs one of these; so does the CPU emulator of
// tests/cuda_emu, which is how the sequence and its kernels run on a machine without a GPU.
// Outputs and workspaces need not be initialised: every element is written (T == 0 included).

// Which kernel failed to launch (kernel == nullptr when err == cudaSuccess).
struct LaunchStatus {
  cudaError_t err;
  const char* kernel;
};

template <typename T>
struct ForwardArgs {
  const T* x;            // [T, d_in]
  const T* A;            // [r, d_in]
  const T* B;            // [N, d_out, r]
  const T* W;            // [g*N, d_in] router, or null
  const float* logits;   // [T, g*N] external logits (fp32), or null; not both with W
  const T* residual;     // [T, d_out], or null
  T* y;                  // [T, d_out]
  float* h;              // [T, r]
  float* pi;             // [T, g, N]; uniform (1 when N == 1) without W and logits
  float* ws;             // workspace of plan.ws_floats floats (null if 0)
  MixShape s;
  float scaling, dropout_p;
  uint64_t seed;
  ForwardPlan plan;      // forward_plan(s, W != null, the SM count, the max cluster): the
                         // launch's grid and clusters, ws's size
};

template <typename T>
struct BackwardArgs {
  const T* dy;           // [T, d_out]
  const T* x;            // [T, d_in]
  const T* A;            // [r, d_in]
  const T* B;            // [N, d_out, r]
  const T* W;            // [g*N, d_in] router, or null
  const float* h;        // [T, r] from the forward
  const float* pi;       // [T, g, N] from the forward
  const float* dpi;      // [T, g, N] extra gradient on pi (a loss on the routing), or null
  T* dx;                 // [T, d_in]
  T* dA;                 // [r, d_in]
  T* dB;                 // [N, d_out, r]
  T* dW;                 // [g*N, d_in]; null when W is
  float* dz;             // [T, g*N] gradient of the logits
  float* dh_ws;          // workspace [T, r]
  float* dpi_ws;         // workspace [T, g, N]
  float* ws;             // workspace of plan.ws_floats floats
  MixShape s;
  float scaling, dropout_p;
  uint64_t seed;
  BackwardPlan plan;     // backward_plan(s, W != null, the device's SM count): the splits of
                         // the dy, dB and dA/dW kernels, ws's size
};

template <typename T>
cudaError_t launch_forward(const ForwardArgs<T>& a, cudaStream_t stream);
template <typename T>
LaunchStatus mix_forward(const ForwardArgs<T>& a, cudaStream_t stream);
template <typename T>
LaunchStatus mix_backward(const BackwardArgs<T>& a, cudaStream_t stream);

// ---- dropout / build facts ------------------------------------------------------------------
// keep[t, k] = dropout_keep(seed, t, k, d_in, p) (philox.h), the mask the kernels draw.
cudaError_t launch_dropout_keep_mask(bool* keep, int64_t T, int64_t d_in, float dropout_p,
                                     uint64_t seed, cudaStream_t stream);
// nvcc's __CUDA_ARCH_LIST__ for the kernels' translation units, e.g. "800,900".
const char* compiled_arch_list();

}  // namespace mtlora
