// Device building blocks shared by the mix kernels: conversions, tile loaders into shared
// memory, and one block-level tile GEMM (tensor cores via WMMA for fp16/bf16, FMA for fp32).
//
// Every kernel is written the same way, which keeps the index math in a few audited places:
// a block of kThreads threads owns a BM x BN output tile; for each K-chunk of width KC two
// loaders fill As [BM][KC] and Bs [BN][KC] (K contiguous, zero outside the matrices, any
// elementwise transform -- dropout, routing weight -- applied on the way into shared memory),
// then TileMma accumulates C += As . Bs^T in fp32 while the loaders' global reads of the next
// chunk are in flight (gemm_over_k; operands that need no transform can instead take the
// cp.async pipeline of gemm_over_k_pipelined). Epilogues go through Cs [BM][BN] fp32 in shared
// memory, whose element -> (row, col) map is explicit, so per-element routing weights need no
// knowledge of the opaque WMMA fragment layout.
//
// NOT verified on hardware (emulated on the CPU only); see mtlora.h.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "mtlora.h"
#include "philox.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "mtlora_kernels._C needs sm_80 or newer (bf16 tensor cores); set TORCH_CUDA_ARCH_LIST"
#endif

namespace mtlora {

constexpr int kThreads = 128;  // 4 warps per block, every kernel
constexpr int BN = 64;         // tile width (output columns / N-dim of every tile GEMM)
constexpr int BK = 32;         // K-chunk staged in shared memory per step (64-row tiles)
constexpr int LDC = BN + 4;    // Cs row stride in floats: a multiple of 4 (WMMA store), 16 B rows

// The K-chunk of a BM-row tile GEMM. 16-bit decode tiles (BM = 16) take twice the width: a
// sweep over d_in = 4096 is then 64 steps instead of 128, and each step waits on its global
// reads about once, with too little MMA work in a 16-row tile to hide that. 128 was tried: the
// bf16 forward then spilled 48 B at 255 registers on sm_80. fp32 keeps 32: its K sums are
// two-level per chunk (TileMma<float>), and with 64-term chunks dA of the cancellation case in
// RELIABILITY.md (T = 1, r = 1, N = 16) went 1.48e-5 off, over the fp32 tolerance of 1e-5.
template <typename T, int BM>
constexpr int kChunk = BM == 16 && sizeof(T) == 2 ? 64 : BK;

// Shared-memory row stride of an As/Bs tile with K-chunk KC, in elements. 16-bit types: KC + 8
// keeps rows 16 B aligned and every 16-row fragment pointer 32 B aligned (WMMA's requirement:
// 16 * (KC + 8) * 2 B is a multiple of 32). fp32: KC + 1 makes the column reads of the FMA path
// bank-conflict free (an odd stride in words).
template <typename T, int KC>
constexpr int kLds = sizeof(T) == 2 ? KC + 8 : KC + 1;

// ---- conversions ----------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16-byte vector access. Callers guarantee 16 B alignment (checked on the host: base pointer
// aligned and row length * sizeof a multiple of 16, column offsets multiples of the vector).
template <typename Src>
__device__ __forceinline__ void load_vec16(const Src* p, float* v) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const Src* e = reinterpret_cast<const Src*>(&raw);
#pragma unroll
  for (int u = 0; u < int(16 / sizeof(Src)); ++u) v[u] = to_f(e[u]);
}

// Store 8 consecutive values (16 B for 16-bit types, 2 x 16 B for fp32): packed into 32-bit
// words in registers, stored by __stwb (st.global.wb.v4, the default write-back policy). A T[8]
// array reinterpreted as uint4 compiled to four 4-byte stores for 16-bit T in the dx kernel and
// the forward (st.global.v2.u16, nvcc 13.0), and so did a plain uint4 assignment of the words.
template <typename T>
__device__ __forceinline__ void store_vec8(T* p, const float* v) {
  constexpr int kWords = 2 * int(sizeof(T));  // 8 values of sizeof(T) bytes
  uint32_t w[kWords];
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const T t = from_f<T>(v[u]);
    if constexpr (sizeof(T) == 4) {
      std::memcpy(&w[u], &t, 4);
    } else {
      uint16_t bits;
      std::memcpy(&bits, &t, 2);
      w[u / 2] = u % 2 ? w[u / 2] | (uint32_t(bits) << 16) : uint32_t(bits);
    }
  }
  uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int q = 0; q < kWords / 4; ++q)
    __stwb(dst + q, uint4{w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]});
}

template <typename T>
__device__ __forceinline__ void load_vec8(const T* p, float* v) {
#pragma unroll
  for (int u = 0; u < int(8 * sizeof(T) / 16); ++u)
    load_vec16(p + u * (16 / sizeof(T)), v + u * (16 / sizeof(T)));
}

struct Identity {
  __device__ __forceinline__ float operator()(int64_t, int64_t, float v) const { return v; }
};

// S[i] = v rounded to T and, when S_lo is given, S_lo[i] = what that rounding lost, also in T:
// hi + lo carries about 16 significant bits of an fp32 operand into a 16-bit tensor-core GEMM
// (two MMAs, hi and lo, into one fp32 accumulator). Used where an fp32 gradient (dh, dz) meets
// a reduction over tokens or the dx GEMM. On an ill-conditioned fuzz example (bf16, cancellation
// over 4 tokens; tests/test_fuzz.py, long profile) dA and dx were 6.0% and 10% off with dh
// rounded to bf16 (over the test's 5.8% / 8.8%), 2.7% and 4.5% with the split (torch backend,
// which keeps dh fp32: 0.7% and 1.7%). Measured in the CPU emulator.
//
// fp16: the low half is stored times lo_scale = 2^11 (and its product scaled back, gemm_over_k):
// what rounding to fp16 loses from a value below fp16's normal range (~6e-5) is below 2^-25,
// and unscaled it would be rounded to fp16's subnormal grid (2^-24) again, i.e. lost. Scaled,
// it lands in the normal range. No overflow: |v - hi| <= |v| * 2^-11 in the normal range.
// Measured in the CPU emulator: fp16 dW_route with dz ~1e-6 was 1.09% off (tolerance 0.77%)
// without the scale (tests/test_fuzz.py, test_regression_fp16_dW_route_with_subnormal_dz),
// and with 2^4 instead of 2^11 dx was 0.19 off (tolerance 1.1e-2) where dz cancels across
// experts at scaling 1e-5 (tests/test_extreme.py, test_router_offset_shared_by_a_group_...).
// bf16 has fp32's exponent range and needs none (as the Triton kernels' mma_split).
template <typename T>
__host__ __device__ constexpr float lo_scale() {
  return std::is_same_v<T, __half> ? 2048.f : 1.f;
}
// What rounding v to T loses, times lo_scale<T>() (both steps exact in fp32).
template <typename T>
__device__ __forceinline__ float rounding_residual(float v) {
  return (v - to_f(from_f<T>(v))) * lo_scale<T>();
}
template <typename T>
__device__ __forceinline__ void split_store(T* S, T* S_lo, int i, float v) {
  S[i] = from_f<T>(v);
  if (S_lo != nullptr) S_lo[i] = from_f<T>(rounding_residual<T>(v));
}

// ---- tile loaders ---------------------------------------------------------------------------
// A loader stages one operand of a tile GEMM, one K-chunk of width KC at a time, in two steps:
// fetch(k0) reads this thread's share of the chunk at k0 from global memory into registers
// (raw, untransformed), and put() converts it, applies the elementwise transform f and stores
// it into its shared-memory tile. gemm_over_k fetches chunk k + 1 before the MMA of chunk k,
// so the global loads are in flight while the tensor cores work (register prefetch, one chunk
// deep), and f runs on values already in registers.

// Where element (row, col) of a tile operand lives: p (null: the element is 0; sources decide
// that per row, so a null p zeroes the whole row) and whether the V = 16 / sizeof(Src)
// elements from col on are contiguous from p and 16 B aligned, so that one vector load reads
// them (the loader asks only for col a multiple of V).
template <typename Src>
struct ElemSrc {
  const Src* p;
  bool vec;
};

// S[rr][kk] = f(row, col, *src(row, col).p) with row = row0 + rr, col = k0 + kk, for
// rr < ROWS, kk < KC; 0 where src gives null or col >= ncols (f is only called in bounds).
// S_lo (16-bit T only, may be null): also store what rounding to T lost (split_store).
// A thread's share is ITEMS runs of V elements along a row, starting at k0 + multiples of V,
// which fetch prefetches as 16 B vectors. A run that is not one whole vector (it straddles
// ncols, the source is unaligned, or k0 is not a multiple of V: the dy kernel's K ranges
// start at group boundaries) makes the thread's chunk "slow": put() then reads the chunk
// element by element in a rolled loop, so that rare case adds no registers to the common one.
template <int ROWS, int KC_, typename T, typename Src, typename SrcOf, typename F>
struct RowLoader {
  static constexpr int KC = KC_;
  static constexpr int V = 16 / sizeof(Src);  // 8 for 16-bit sources, 4 for fp32
  static constexpr int PER_ROW = KC / V;
  static constexpr int ITEMS = (ROWS * PER_ROW + kThreads - 1) / kThreads;
  static_assert(ITEMS <= 32, "a bit of live per item");
  T* S;
  T* S_lo;
  SrcOf src;
  F f;
  int64_t row0, ncols, col0 = 0;
  uint4 raw[ITEMS];  // the bits of run i
  unsigned live;     // bit i: run i was read (else it is 0)
  bool slow;

  __device__ __forceinline__ void fetch(int64_t k0) {
    col0 = k0;
    live = 0;
    slow = false;
    const bool on_vec = k0 % V == 0;  // every run starts on a vector (ElemSrc's vec condition)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int q = threadIdx.x + i * kThreads;
      if (q >= ROWS * PER_ROW) continue;
      const int64_t col = col0 + (q % PER_ROW) * V;
      const ElemSrc<Src> g = src(row0 + q / PER_ROW, col);
      if (g.p == nullptr || col >= ncols) continue;
      if (g.vec && on_vec && col + V <= ncols) {
        raw[i] = *reinterpret_cast<const uint4*>(g.p);
        live |= 1u << i;
      } else {
        slow = true;
      }
    }
  }
  __device__ __forceinline__ void put() const {
    if (slow) {
      for (int q = threadIdx.x; q < ROWS * PER_ROW; q += kThreads) {
        const int rr = q / PER_ROW, kk = (q % PER_ROW) * V;
        const int64_t row = row0 + rr, col = col0 + kk;
#pragma unroll
        for (int u = 0; u < V; ++u) {
          const Src* e = col + u < ncols ? src(row, col + u).p : nullptr;
          split_store(S, S_lo, rr * kLds<T, KC> + kk + u,
                      e != nullptr ? f(row, col + u, to_f(*e)) : 0.f);
        }
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int q = threadIdx.x + i * kThreads;
      if (q >= ROWS * PER_ROW) continue;
      const int rr = q / PER_ROW, kk = (q % PER_ROW) * V;
      const Src* e = reinterpret_cast<const Src*>(&raw[i]);
#pragma unroll
      for (int u = 0; u < V; ++u) {
        const float v = live >> i & 1u ? f(row0 + rr, col0 + kk + u, to_f(e[u])) : 0.f;
        split_store(S, S_lo, rr * kLds<T, KC> + kk + u, v);
      }
    }
  }
};

// (The loaders' KC must be the K-chunk of the TileMma they feed; gemm_over_k checks it.)
template <int ROWS, int KC = BK, typename T, typename SrcOf, typename F>
__device__ __forceinline__ auto tile_loader(T* S, SrcOf src, int64_t row0, int64_t ncols, F f,
                                            T* S_lo = nullptr) {
  using Src = std::remove_cv_t<std::remove_pointer_t<decltype(src(int64_t(0), int64_t(0)).p)>>;
  return RowLoader<ROWS, KC, T, Src, SrcOf, F>{S, S_lo, src, f, row0, ncols};
}

// The common source: the row-major G (leading dimension ldg), zero from row nrows on.
// vec_ok: G is 16 B aligned and ldg * sizeof(Src) % 16 == 0.
template <typename Src>
__device__ __forceinline__ auto row_major(const Src* G, int64_t ldg, int64_t nrows, bool vec_ok) {
  return [=](int64_t row, int64_t col) {
    return ElemSrc<Src>{row < nrows ? G + row * ldg + col : nullptr, vec_ok};
  };
}

// The common case: rows row0 .. of row_major(G, ldg, nrows, vec_ok).
template <int ROWS, int KC = BK, typename T, typename Src, typename F>
__device__ __forceinline__ auto rows_loader(T* S, const Src* G, int64_t ldg, int64_t row0,
                                            int64_t nrows, int64_t ncols, bool vec_ok, F f,
                                            T* S_lo = nullptr) {
  return tile_loader<ROWS, KC>(S, row_major(G, ldg, nrows, vec_ok), row0, ncols, f, S_lo);
}

// The raw items a loader holds across the MMA of the previous chunk. 16-bit values go two per
// 32-bit word (as an array of __half each took a register of its own): set(i) must run for
// i = 0, 1, ... in order (an even item's set clears its word), as the loaders' unrolled loops do.
template <typename Src, int N, bool kPacked = sizeof(Src) == 2>
struct RawItems {
  Src v[N];
  __device__ __forceinline__ void set(int i, Src x) { v[i] = x; }
  __device__ __forceinline__ float get(int i) const { return to_f(v[i]); }
};
template <typename Src, int N>
struct RawItems<Src, N, true> {
  unsigned w[(N + 1) / 2];
  __device__ __forceinline__ void set(int i, Src x) {
    unsigned short u;
    memcpy(&u, &x, sizeof u);
    w[i / 2] = i % 2 ? (w[i / 2] & 0xffffu) | unsigned(u) << 16 : unsigned(u);
  }
  __device__ __forceinline__ float get(int i) const {
    const auto u = static_cast<unsigned short>(w[i / 2] >> (16 * (i % 2)));
    Src x;
    memcpy(&x, &u, sizeof x);
    return to_f(x);
  }
};

template <int ROWS>
__device__ __forceinline__ int col_of_thread() {  // ColLoader<ROWS>'s column of this thread
  return threadIdx.x % ROWS;
}

// ColLoader's column map: where column icol of a row starts, relative to the row. The default
// is a plain row-major matrix; a gathered operand (the backward's concatenated B_e) maps its own.
struct LinearCols {
  __device__ __forceinline__ int64_t operator()(int64_t icol) const { return icol; }
};

// Transposed: S[ii][kk] = f(krow, icol, G[krow * ldg + col_at(icol)]) with krow = k0 + kk,
// icol = i0 + ii, for ii < ROWS, kk < KC; 0 outside krow < nk, icol < ni. Consecutive threads
// take consecutive icol, so the global reads stay coalesced along G's rows (for LinearCols).
// Scalar loads: ITEMS per thread.
template <int ROWS, int KC_, typename T, typename Src, typename F, typename ColMap = LinearCols>
struct ColLoader {
  static constexpr int KC = KC_;
  static constexpr int ITEMS = ROWS * KC / kThreads;
  static constexpr int KSTEP = kThreads / ROWS;  // chunk rows between a thread's items
  static_assert(kThreads % ROWS == 0 && ITEMS <= 32, "fixed column per thread, a bit per item");
  static_assert(KC * kMaxRowLength <= (int64_t(1) << 31), "32-bit offsets within a chunk");
  T* S;
  T* S_lo;
  const Src* G;
  F f;
  ColMap col_at;
  int64_t ldg, nk, i0, ni, k0 = 0;
  RawItems<Src, ITEMS> raw;
  unsigned valid;  // bit i: raw item i was read

  __device__ __forceinline__ void fetch(int64_t k) {
    k0 = k;
    valid = 0;
    // This thread's column is fixed; its rows are kk0, kk0 + KSTEP, ... of the chunk. One
    // 64-bit base per chunk and 32-bit offsets within it (ldg < kMaxRowLength, checked on the
    // host, and KC * kMaxRowLength <= 2^31) keep the unrolled loads from holding ITEMS 64-bit
    // addresses across the K loop.
    const int ii = col_of_thread<ROWS>(), kk0 = threadIdx.x / ROWS;
    if (i0 + ii >= ni) return;
    const Src* base = G + (k0 + kk0) * ldg + col_at(i0 + ii);
    const int64_t left = nk - (k0 + kk0);  // rows of the chunk in bounds, from kk0 on
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (KSTEP * i < left) {
        raw.set(i, base[KSTEP * i * int(ldg)]);
        valid |= 1u << i;
      }
    }
  }
  __device__ __forceinline__ void put() const {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int ii = col_of_thread<ROWS>(), kk = threadIdx.x / ROWS + KSTEP * i;
      const float v = valid >> i & 1u ? f(k0 + kk, i0 + ii, raw.get(i)) : 0.f;
      split_store(S, S_lo, ii * kLds<T, KC> + kk, v);
    }
  }
};

template <int ROWS, int KC = BK, typename T, typename Src, typename F,
          typename ColMap = LinearCols>
__device__ __forceinline__ auto cols_loader(T* S, const Src* G, int64_t ldg, int64_t nk,
                                            int64_t i0, int64_t ni, F f, T* S_lo = nullptr,
                                            ColMap col_at = {}) {
  return ColLoader<ROWS, KC, T, Src, F, ColMap>{S, S_lo, G, f, col_at, ldg, nk, i0, ni};
}

// ---- block tile GEMM: C[BM][BN] += As[BM][KC] . Bs[BN][KC]^T ------------------------------------
// 16-bit types: WMMA 16x16x16 with fp32 accumulators. The 4 warps tile the block as WM x WN:
// BM = 64 -> 4 x 1 (each warp 16 rows x 64 cols = 4 fragments); BM = 16 (decode) -> 1 x 4
// (each warp 16 x 16), so a T <= 16 call does not compute 48 empty rows.
template <typename T, int BM>
struct TileMma {
  static_assert(BM == 16 || BM == 64, "BM must be 16 or 64");
  static constexpr int WM = BM / 16;
  static constexpr int WN = 4 / WM;
  static constexpr int FN = BN / (16 * WN);
  static constexpr int KC = kChunk<T, BM>;
  static constexpr int LDS = kLds<T, KC>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int f = 0; f < FN; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.f);
  }
  __device__ __forceinline__ void mma(const T* As, const T* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp % WM, wn = warp / WM;
#pragma unroll
    for (int kk = 0; kk < KC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, As + wm * 16 * LDS + kk, LDS);
#pragma unroll
      for (int f = 0; f < FN; ++f) {
        // Bs[n][k] with k contiguous is the K x N operand in column-major order.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, Bs + (wn * FN + f) * 16 * LDS + kk, LDS);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
  }
  // acc *= f, elementwise (exact for a power of two).
  __device__ __forceinline__ void scale(float f) {
#pragma unroll
    for (int n = 0; n < FN; ++n)
#pragma unroll
      for (int i = 0; i < acc[n].num_elements; ++i) acc[n].x[i] *= f;
  }
  __device__ __forceinline__ void store(float* Cs) {
    const int warp = threadIdx.x / 32;
    const int wm = warp % WM, wn = warp / WM;
#pragma unroll
    for (int f = 0; f < FN; ++f)
      nvcuda::wmma::store_matrix_sync(Cs + wm * 16 * LDC + (wn * FN + f) * 16, acc[f], LDC,
                                      nvcuda::wmma::mem_row_major);
  }
};

// fp32: FMA on CUDA cores (tf32 tensor cores would miss the 1e-5 fp32 tolerance). Threads form
// an 8 x 16 grid; thread (ty, tx) owns rows ty + 8m and columns tx + 16n (strided, so a warp
// reads 2 rows of As (broadcast) and 16 distinct rows of Bs (stride 33: no bank conflict)).
template <int BM>
struct TileMma<float, BM> {
  static_assert(BM == 16 || BM == 64, "BM must be 16 or 64");
  static constexpr int TM = BM / 8;
  static constexpr int TN = BN / 16;
  static constexpr int KC = kChunk<float, BM>;
  static constexpr int LDS = kLds<float, KC>;
  float acc[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
      for (int n = 0; n < TN; ++n) acc[m][n] = 0.f;
  }
  // Each K-chunk is summed on its own and then added to acc: two levels of KC-term sums instead
  // of one sequential sum over all of K (65536 terms for dh at d = 4096, N = 16), whose rounding
  // error grows with K. Measured in the CPU emulator: dA off by 1.4e-5 (fp32 tolerance 1e-5) on
  // a 384-term sum with cancellation (T = 1, r = 1, N = 16) with one level, 6.8e-6 with two.
  __device__ __forceinline__ void mma(const float* As, const float* Bs) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float part[TM][TN];
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
      for (int n = 0; n < TN; ++n) part[m][n] = 0.f;
#pragma unroll 4
    for (int kk = 0; kk < KC; ++kk) {
      float a[TM], b[TN];
#pragma unroll
      for (int m = 0; m < TM; ++m) a[m] = As[(ty + 8 * m) * LDS + kk];
#pragma unroll
      for (int n = 0; n < TN; ++n) b[n] = Bs[(tx + 16 * n) * LDS + kk];
#pragma unroll
      for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int n = 0; n < TN; ++n) part[m][n] = fmaf(a[m], b[n], part[m][n]);
    }
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
      for (int n = 0; n < TN; ++n) acc[m][n] += part[m][n];
  }
  __device__ __forceinline__ void store(float* Cs) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
      for (int n = 0; n < TN; ++n) Cs[(ty + 8 * m) * LDC + tx + 16 * n] = acc[m][n];
  }
};

// Shared memory of one tile GEMM block, carved from raw bytes (16-bit types have constructors,
// which __shared__ arrays may not have). Sizes (KB = 1024 B, as CUDA's limits) for BM = 64:
// 16-bit 27.0 KB, fp32 33.5 KB; BM = 16: 15.5 KB (16-bit, 64-wide chunks) and 14.6 KB.
// One ROWS-row operand tile with K-chunk KC in shared memory, rounded up to 128 B: As or Bs of
// TileSmem, and one stage of them in StagedSmem / AsyncRowLoader.
template <typename T, int ROWS, int KC>
constexpr int kStageBytes = (ROWS * kLds<T, KC> * int(sizeof(T)) + 127) / 128 * 128;

template <typename T, int BM>
struct TileSmem {
  static constexpr int KC = kChunk<T, BM>;
  static constexpr int kAsOff = 0;
  static constexpr int kBsOff = kStageBytes<T, BM, KC>;
  static constexpr int kCsOff = kBsOff + kStageBytes<T, BN, KC>;
  static constexpr int kBytes = kCsOff + BM * LDC * int(sizeof(float));
  // A second As for the low half of a split fp32 operand (split_store), 16-bit types only.
  static constexpr int kAsLoOff = kBytes;
  static constexpr int kSplitBytes = kBytes + (sizeof(T) == 2 ? kBsOff : 0);
};

// As, Bs and Cs of the TileSmem<T, BM> layout inside raw (at least kBytes, 128 B aligned).
// As_lo: the split operand's low half, or null for fp32 (valid when raw has kSplitBytes).
template <typename T>
struct TileBuffers {
  T* As;
  T* Bs;
  float* Cs;
  T* As_lo;
};
template <typename T, int BM>
__device__ __forceinline__ TileBuffers<T> tile_buffers(unsigned char* raw) {
  using L = TileSmem<T, BM>;
  return {reinterpret_cast<T*>(raw + L::kAsOff), reinterpret_cast<T*>(raw + L::kBsOff),
          reinterpret_cast<float*>(raw + L::kCsOff),
          sizeof(T) == 2 ? reinterpret_cast<T*>(raw + L::kAsLoOff) : nullptr};
}

// (Plain pointers, not structured bindings: lambdas capture them, which C++17 forbids for
// bindings.)
#define MTLORA_TILE_SMEM(T, BM)                                               \
  __shared__ __align__(128) unsigned char smem_raw_[TileSmem<T, BM>::kBytes]; \
  T* As = tile_buffers<T, BM>(smem_raw_).As;                                  \
  T* Bs = tile_buffers<T, BM>(smem_raw_).Bs;                                  \
  float* Cs = tile_buffers<T, BM>(smem_raw_).Cs

// C += As . Bs^T over K in [k_begin, k_end), Mma::KC at a time, As and Bs staged by the loaders a
// and b (into a.S and b.S). The fetch of the next chunk is issued before the MMA of this one;
// the barriers order every thread's put before the MMA and the MMA before the next put.
// a.S_lo (may be null): the low half of a split A operand (split_store), stored times
// lo_scale: C = (C * lo_scale + As_lo . Bs^T) / lo_scale, exact scalings of the fp32
// accumulator (no second accumulator, so no extra registers).
template <typename Mma, typename LoadA, typename LoadB>
__device__ __forceinline__ void gemm_over_k(Mma& acc, LoadA& a, LoadB& b, int64_t k_begin,
                                            int64_t k_end) {
  constexpr int KC = Mma::KC;
  static_assert(LoadA::KC == KC && LoadB::KC == KC, "loaders staged for another K-chunk");
  if (k_begin >= k_end) return;
  a.fetch(k_begin);
  b.fetch(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += KC) {
    a.put();
    b.put();
    __syncthreads();
    if (k0 + KC < k_end) {
      a.fetch(k0 + KC);
      b.fetch(k0 + KC);
    }
    acc.mma(a.S, b.S);
    if (a.S_lo != nullptr) {
      using E = std::remove_pointer_t<decltype(a.S)>;
      constexpr float f = lo_scale<E>();
      if constexpr (f != 1.f) acc.scale(f);
      acc.mma(a.S_lo, b.S);
      if constexpr (f != 1.f) acc.scale(1.f / f);
    }
    __syncthreads();
  }
}

// ---- the multi-stage pipeline (16-bit operands staged as they are) -------------------------
// gemm_over_k's register prefetch keeps one chunk of loads in flight per thread, which a long
// sweep over d_in waits on at every step. An operand that needs no transform (no dropout, no
// conversion: 16-bit, stored as read) can instead go from global to shared memory with
// cp.async (sm_80+), no registers in between, STAGES - 1 chunks ahead. 16-bit only: fp32
// tiles have odd row strides (kLds) that break cp.async's 16 B alignment.

// The most shared memory one block may opt into (cudaFuncAttributeMaxDynamicSharedMemorySize)
// on every GPU the extension builds for: 99 KB on sm_86 / sm_89 / sm_120 (163 KB on sm_80,
// 227 KB on sm_90). The CPU emulator refuses a launch over it.
constexpr int kMaxSmemOptin = 99 * 1024;

// Shared memory of a pipelined tile GEMM: STAGES copies of As, then of Bs, then Cs (offsets
// named as TileSmem's). A synchronous tile GEMM in the same kernel takes stage 0 of each as its
// As / Bs (the same size). One stage of BM = 64 (K-chunk 32) is 10 KB, of BM = 16 (K-chunk
// 64) 11.3 KB.
template <typename T, int BM, int STAGES>
struct StagedSmem {
  static constexpr int KC = kChunk<T, BM>;
  static constexpr int kAsStage = kStageBytes<T, BM, KC>;
  static constexpr int kBsStage = kStageBytes<T, BN, KC>;
  static constexpr int kAsOff = 0;
  static constexpr int kBsOff = STAGES * kAsStage;
  static constexpr int kCsOff = kBsOff + STAGES * kBsStage;
  static constexpr int kBytes = kCsOff + BM * LDC * int(sizeof(float));
  static_assert(STAGES >= 2, "a stage to fill while one is read");
  static_assert(kBytes <= kMaxSmemOptin, "over the opt-in shared memory of some sm_8x GPUs");
};

// S[stage][rr][kk] = *src(row0 + rr, k0 + kk), 0 where src gives null or col >= ncols: a
// RowLoader without transform whose whole vectors are cp.async copies (a vector cut by ncols
// copies its in-bounds part and zero-fills the rest). Runs of an unaligned source, or of a k0
// off a vector, are stored element by element at issue time (rare: odd sizes).
template <int ROWS, int KC_, typename T, typename SrcOf>
struct AsyncRowLoader {
  static_assert(sizeof(T) == 2, "16-bit operands only (16 B aligned shared rows)");
  static constexpr int KC = KC_;
  static constexpr int V = 8;
  static constexpr int PER_ROW = KC / V;
  static constexpr int ITEMS = (ROWS * PER_ROW + kThreads - 1) / kThreads;
  static constexpr int kStageElems = kStageBytes<T, ROWS, KC> / int(sizeof(T));
  T* S;  // stage 0
  SrcOf src;
  int64_t row0, ncols;

  __device__ __forceinline__ T* stage(int st) const { return S + st * kStageElems; }
  __device__ __forceinline__ void issue(int64_t k0, int st) const {
    T* dst = stage(st);
    const bool on_vec = k0 % V == 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int q = threadIdx.x + i * kThreads;
      if (q >= ROWS * PER_ROW) continue;
      const int rr = q / PER_ROW, kk = (q % PER_ROW) * V;
      const int64_t row = row0 + rr, col = k0 + kk;
      T* d = dst + rr * kLds<T, KC> + kk;
      const ElemSrc<T> g = src(row, col);
      if (g.p == nullptr || col >= ncols) {
        *reinterpret_cast<uint4*>(d) = uint4{};
      } else if (g.vec && on_vec) {
        const int64_t left = ncols - col;
        __pipeline_memcpy_async(d, g.p, 16, left >= V ? 0 : size_t(V - left) * sizeof(T));
      } else {
        for (int u = 0; u < V; ++u) d[u] = col + u < ncols ? *src(row, col + u).p : from_f<T>(0.f);
      }
    }
  }
};

template <int ROWS, int KC, typename T, typename SrcOf>
__device__ __forceinline__ auto async_tile_loader(T* S, SrcOf src, int64_t row0, int64_t ncols) {
  return AsyncRowLoader<ROWS, KC, T, SrcOf>{S, src, row0, ncols};
}

template <int ROWS, int KC, typename T>
__device__ __forceinline__ auto async_rows_loader(T* S, const T* G, int64_t ldg, int64_t row0,
                                                  int64_t nrows, int64_t ncols, bool vec_ok) {
  return async_tile_loader<ROWS, KC>(S, row_major(G, ldg, nrows, vec_ok), row0, ncols);
}

template <typename L>
inline constexpr bool kAsyncLoader = false;
template <int ROWS, int KC, typename T, typename SrcOf>
inline constexpr bool kAsyncLoader<AsyncRowLoader<ROWS, KC, T, SrcOf>> = true;

// C += As . Bs^T over K in [k_begin, k_end), B through the pipeline, STAGES - 1 chunks in
// flight. Iteration i waits for chunk i (this thread's copies), a barrier makes every thread's
// copies visible and ends every thread's MMA of chunk i - 1, whose stage then takes chunk
// i + STAGES - 1. One commit group per chunk slot (empty ones included), so wait_prior counts
// stay uniform. Ends with a barrier: the stages may be refilled and Cs written after it.
// A takes one of two paths, chosen by its loader's type:
//  - an AsyncRowLoader (no transform): the pipeline too, in the same stages and commit groups
//    as B; As2 is unused.
//  - a RowLoader / ColLoader (any transform): registers, one chunk ahead, as in gemm_over_k,
//    alternating between two buffers, a.S and As2 (the same size). The barrier of iteration
//    i orders both: the put of chunk i into buffer i % 2 comes before it, and after barrier
//    i - 1, which every thread reaches only after its MMA of chunk i - 2, that buffer's last
//    reader.
template <int STAGES, typename Mma, typename LoadA, typename LoadB>
__device__ __forceinline__ void gemm_over_k_pipelined(Mma& acc, LoadA& a, const LoadB& b,
                                                      int64_t k_begin, int64_t k_end,
                                                      decltype(LoadA::S) As2 = nullptr) {
  constexpr int KC = Mma::KC;
  constexpr bool kAsyncA = kAsyncLoader<LoadA>;
  static_assert(LoadA::KC == KC && LoadB::KC == KC, "loaders staged for another K-chunk");
  const int64_t chunks = k_end > k_begin ? (k_end - k_begin + KC - 1) / KC : 0;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < chunks) {
      if constexpr (kAsyncA) a.issue(k_begin + st * KC, st);
      b.issue(k_begin + st * KC, st);
    }
    __pipeline_commit();
  }
  const auto As1 = a.S;
  if constexpr (!kAsyncA) {
    if (chunks > 0) a.fetch(k_begin);
  }
  int st = 0;  // = i % STAGES
  for (int64_t i = 0; i < chunks; ++i) {
    if constexpr (!kAsyncA) {
      a.S = i & 1 ? As2 : As1;
      a.put();
      if (i + 1 < chunks) a.fetch(k_begin + (i + 1) * KC);
    }
    __pipeline_wait_prior(STAGES - 2);
    __syncthreads();
    const int64_t next = i + STAGES - 1;
    if (next < chunks) {
      const int nst = st == 0 ? STAGES - 1 : st - 1;  // = next % STAGES
      if constexpr (kAsyncA) a.issue(k_begin + next * KC, nst);
      b.issue(k_begin + next * KC, nst);
    }
    __pipeline_commit();
    if constexpr (kAsyncA) {
      acc.mma(a.stage(st), b.stage(st));
    } else {
      acc.mma(a.S, b.stage(st));
    }
    st = st == STAGES - 1 ? 0 : st + 1;
  }
  a.S = As1;
  __pipeline_wait_prior(0);
  __syncthreads();
}

// Epilogues where each thread owns 8 consecutive columns of a [rows][BN] tile: chunk i of this
// thread is row rr, columns cc .. cc + 7.
__device__ __forceinline__ void own_chunk(int i, int& rr, int& cc) {
  const int q = threadIdx.x + i * kThreads;
  rr = q / (BN / 8);
  cc = (q % (BN / 8)) * 8;
}

// Dropout as the kernels apply it to x[t][k] (row length d_in): kept entries scaled by
// 1 / (1 - p), the others 0; the identity when p == 0. Usable as a tile loader's transform.
struct Dropout {
  float p, keep_scale;
  uint64_t seed;
  int64_t d_in, k_off;
  __device__ __forceinline__ Dropout(float p_, uint64_t seed_, int64_t d_in_, int64_t k_off_ = 0)
      : p(p_), keep_scale(1.f / (1.f - p_)), seed(seed_), d_in(d_in_), k_off(k_off_) {}
  __device__ __forceinline__ float operator()(int64_t t, int64_t k, float v) const {
    if (p <= 0.f) return v;
    return dropout_keep(seed, t, k_off + k, d_in, p) ? v * keep_scale : 0.f;
  }
};

// ---- host (and device) helpers --------------------------------------------------------------
__host__ __device__ inline bool vec_ok(const void* p, int64_t row_len, int64_t elem_size) {
  return p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
         (row_len * elem_size) % 16 == 0;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// ---- split reductions -----------------------------------------------------------------------
// A launch that splits a reduction over several blocks (the token splits of dB and dA / dW, the
// column splits of the dy kernel) has split q write its fp32 partial sums to slab q of a
// workspace; this adds the slabs in split order (deterministic, no atomics):
// out[i] = scale * sum_q slabs[q * stride + i] for i < n.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ slabs, int64_t stride,
                                     int64_t splits, int64_t n, float scale, T* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float sum = 0.f;
  for (int64_t q = 0; q < splits; ++q) sum += slabs[q * stride + i];
  out[i] = from_f<T>(scale * sum);
}

template <typename T>
cudaError_t launch_reduce_splits(const float* slabs, int64_t stride, int64_t splits, int64_t n,
                                 float scale, T* out, cudaStream_t stream) {
  reduce_splits_kernel<T><<<ceil_div(n, 256), 256, 0, stream>>>(slabs, stride, splits, n, scale,
                                                                  out);
  return cudaGetLastError();
}

}  // namespace mtlora
