// A CPU emulator of the part of CUDA that csrc/ uses, for running the extension's kernels and
// launch sequence on a machine without a GPU (tests/cuda_emu/__init__.py builds it).
//
// Execution model: a launch runs its blocks one after another, in index order or (a switch tests
// set: reverse_blocks) in reverse, as a GPU may run them in any order, or (another switch:
// concurrent_blocks, which the sanitizer drivers set) several at a time, as SMs do, so
// ThreadSanitizer sees two blocks touching the same global memory as a race. The threads of a block
// are real OS threads (kept from one launch to the next: ThreadPool), so __syncthreads is a real
// barrier, and ThreadSanitizer sees every shared-memory access of a block as a concurrent access (a
// missing barrier is a reported race). Every block that runs at once has its own shared memory:
// `__shared__` arrays (static) and `extern __shared__` (dynamic, a buffer of the launch's size),
// all filled with 0xFF bytes (NaN in fp32, fp16 and bf16) at the start of every block, so a read of
// shared memory that nothing wrote shows up as NaN. Static shared memory may not exceed 48 KB, as
// on the GPU. A launch with more than 48 KB of dynamic shared memory fails unless the kernel opted
// in (cudaFuncSetAttribute) to at least that much, and no opt-in may exceed 99 KB, the least any
// sm_80+ GPU allows (the GPU's limit, stated here on its own: the kernels' bound,
// mtlora::kMaxSmemOptin in common.cuh, is what this checks). Thread-block clusters (sm_90,
// cudaLaunchKernelEx with a cluster dimension): the blocks of one cluster run at the same time,
// each with its own dynamic shared memory, which the others reach through
// __cluster_map_shared_rank; __cluster_barrier_arrive / _wait is a real split barrier over all of
// the cluster's threads (TSan sees a remote read not ordered by it as a race).
//
// Windows (tests of inputs too large to emulate whole): per kernel name, blocks below a given
// index are skipped and a buffer can be zeroed before each launch (first_block, zero_before).
//
// WMMA: each lane of a warp owns 8 of the 256 accumulator elements (column lane % 16, rows
// lane / 16 + 2m), loads just the operand rows and columns those need and computes them in fp32,
// as the tensor cores accumulate. The union over the 32 lanes reads the whole tile; pointer and
// leading-dimension alignment are checked as the hardware requires them (32 B, 16 B).
//
// What this cannot show: timing, the real fragment layouts (the kernels never touch fragment
// elements), warp-synchronous behaviour (each lane is its own thread: code that relied on
// lockstep would race here, which is stricter than a GPU), the device-only code paths of
// philox.h (under __CUDA_ARCH__; the host twin runs instead), and whether a GPU can schedule a
// cluster (the emulator runs any cluster of up to 8 blocks).
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_ASAN_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define EMU_ASAN_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EMU_ASAN_POISON(p, n) ((void)(p), (void)(n))
#define EMU_ASAN_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// CUDA's device math API has isfinite at global scope (csrc/mix_backward_dy.cu uses it).
using std::isfinite;

// No CUDA runtime: the emulated extension's cuda_version (bindings.cpp) reads 0.0.
#define CUDART_VERSION 0
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
// The store intrinsic csrc/common.cuh's store_vec8 uses; dereferencing the uint4 pointer keeps
// UBSan's alignment check of a 16 B vector store.
inline void __stwb(uint4* p, uint4 v) { *p = v; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;  // written before a launch's threads start, read-only during it

// ---- runtime API ------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorInvalidClusterSize = 912,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace emu {
inline cudaError_t last_error = cudaSuccess;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::abort();
}

// Barrier of n threads (a block's, or a cluster's), split as the cluster barrier is: arrive()
// counts this thread in and returns the phase it arrived in, wait(phase) spins (with yield)
// until all n have arrived in it. A thread that waits over 120 s means some threads never
// reach this barrier (a __syncthreads in divergent code): abort.
class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  unsigned arrive() {
    const unsigned gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_acq_rel);
    }
    return gen;
  }
  void wait(unsigned gen) {
    std::chrono::steady_clock::time_point start{};
    for (unsigned long spins = 1; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      std::this_thread::yield();
      if ((spins & 0xffff) != 0) continue;
      const auto now = std::chrono::steady_clock::now();
      if (start == std::chrono::steady_clock::time_point{}) start = now;
      if (now - start > std::chrono::seconds(120)) fail("a barrier never completed");
    }
  }
  void wait() { wait(arrive()); }

 private:
  const unsigned n_;
  std::atomic<unsigned> count_{0}, gen_{0};
};

// Sleeping while an atomic holds a value, and waking its sleepers: a raw futex, which
// ThreadSanitizer does not see, so the ordering between threads is the atomics' alone (a
// waiter synchronizes with the store it loads, and with nothing later).
static_assert(sizeof(std::atomic<unsigned>) == sizeof(unsigned) &&
              std::atomic<unsigned>::is_always_lock_free);
inline void futex_wait(std::atomic<unsigned>& a, unsigned value) {  // may return early
  syscall(SYS_futex, reinterpret_cast<unsigned*>(&a), FUTEX_WAIT_PRIVATE, value, nullptr,
          nullptr, 0);
}
inline void futex_wake_all(std::atomic<unsigned>& a) {
  syscall(SYS_futex, reinterpret_cast<unsigned*>(&a), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}

// The OS threads that run a launch's CUDA threads, kept from one launch to the next: a thread
// per CUDA thread per launch was most of a sanitizer run's time (126 thousand of them). run(n,
// job) calls job(0) .. job(n - 1), each on its own thread, all at once, and returns when all
// have returned; to ThreadSanitizer that orders the caller and the n calls as starting and
// joining n threads would (the atomics below), and nothing else. Only the n threads wake;
// the others sleep.
class ThreadPool {
 public:
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    const std::lock_guard<std::mutex> lock(run_mutex_);
    while (go_.size() < n) {
      std::atomic<unsigned>& go = go_.emplace_back(0);
      std::thread([this, &go, i = unsigned(go_.size() - 1)] { serve(go, i); }).detach();
    }
    job_ = &job;
    pending_.store(n, std::memory_order_relaxed);
    for (unsigned i = 0; i < n; ++i) {
      go_[i].fetch_add(1, std::memory_order_release);
      futex_wake_all(go_[i]);
    }
    for (unsigned left; (left = pending_.load(std::memory_order_acquire)) != 0;)
      futex_wait(pending_, left);
  }

 private:
  void serve(std::atomic<unsigned>& go, unsigned i) {
    for (unsigned seen = 0;; ++seen) {
      while (go.load(std::memory_order_acquire) == seen) futex_wait(go, seen);
      (*job_)(i);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) futex_wake_all(pending_);
    }
  }
  std::mutex run_mutex_;
  // Per thread: run() adds 1 for each of its jobs. A deque: its elements stay in place.
  std::deque<std::atomic<unsigned>> go_;
  std::atomic<unsigned> pending_{0};
  // Written by run() before its releases of go, read after the acquire.
  const std::function<void(unsigned)>* job_ = nullptr;
};
// Never destroyed: its threads (detached) sleep until the process exits, which also keeps a
// forked child, which has none of them, from waiting on them at its exit.
inline ThreadPool& thread_pool = *new ThreadPool;

// The barrier of this thread's block. In a cluster launch, or with concurrent_blocks > 1,
// several blocks run at once.
inline thread_local Barrier* block_barrier = nullptr;

inline void syncthreads() { block_barrier->wait(); }

// The thread-block cluster of this thread's block (of 1 block without a cluster dimension):
// its blocks' dynamic shared memory, by rank, and the barrier of all its threads.
struct Cluster {
  unsigned size;
  std::vector<unsigned char*> smem;
  Barrier* barrier;
};
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned cluster_rank = 0;
inline thread_local unsigned cluster_phase = 0;  // of this thread's last arrive
inline thread_local bool cluster_arrived = false;

// Static shared memory: `__shared__ unsigned char name[bytes];` is rewritten to `unsigned char*
// name = ::emu::static_shared(bytes, __COUNTER__);` (the counter names the declaration). Its
// first execution in a block takes the next 128-byte aligned piece of the block's buffer
// (kMaxStaticSmem, as the GPU's limit), poisoned, then a barrier so that no thread writes it
// before the poison lands; a later one (a declaration in a loop or a function called twice)
// is the same array, as on a GPU. Under AddressSanitizer the rest of the buffer is poisoned
// for it, so an access past an array is reported.
constexpr size_t kMaxStaticSmem = 48 * 1024;
inline thread_local unsigned char* block_static_smem = nullptr;
inline thread_local size_t block_static_used = 0;  // these two: reset at the start of a block
inline thread_local std::vector<std::pair<int, size_t>> block_static_arrays;  // (site, offset)
inline unsigned char* static_shared(size_t bytes, int site) {
  for (const auto& [s, off] : block_static_arrays)
    if (s == site) return block_static_smem + off;
  const size_t off = (block_static_used + 127) / 128 * 128;
  if (off + bytes > kMaxStaticSmem) fail("static __shared__ arrays over 48 KB in one block");
  block_static_used = off + bytes;
  block_static_arrays.emplace_back(site, off);
  unsigned char* p = block_static_smem + off;
  if (threadIdx.x == 0) {
    EMU_ASAN_UNPOISON(p, bytes);
    std::memset(p, 0xFF, bytes);
  }
  syncthreads();
  return p;
}

// cp.async (include/cuda_pipeline_primitives.h): this thread's copies not yet landed, in the
// open group and in the committed groups, oldest first. Dropped at the end of every block.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t size, zfill;
};
inline thread_local std::vector<AsyncCopy> async_open;
inline thread_local std::deque<std::vector<AsyncCopy>> async_committed;

// Dynamic shared memory: the opt-in of each kernel (cudaFuncSetAttribute), the limits, and the
// current launch's buffer.
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmemOptin = 99 * 1024;
inline std::map<const void*, size_t> smem_optin;
inline size_t dynamic_smem_bytes = 0;  // of the current launch (read-only during it)

// `extern __shared__ unsigned char name[];` is rewritten to `unsigned char* name =
// ::emu::dynamic_shared();`: this block's buffer, poisoned anew for each block.
inline unsigned char* dynamic_shared() {
  unsigned char* buf = cluster->smem[cluster_rank];
  if (threadIdx.x == 0 && buf != nullptr) std::memset(buf, 0xFF, dynamic_smem_bytes);
  syncthreads();
  return buf;
}

// The portable limit of blocks per cluster (what every sm_90 GPU allows without an opt-in).
constexpr unsigned kMaxClusterSize = 8;
// Tests set this to refuse every cluster launch as a GPU does that cannot schedule one (an MPS
// share of too few SMs): cudaErrorInvalidClusterSize.
inline bool refuse_clusters = false;
// Cluster launches that ran (tests read it to see which path a call took).
inline uint64_t cluster_launches = 0;
// Tests set this to run every launch's blocks (clusters, in y) in reverse index order: an
// element that two blocks write, the later one in index order correctly, passes only in order.
inline bool reverse_blocks = false;
// The blocks of a launch without clusters that run at once (each with its own shared memory
// and barrier, taking every concurrent_blocks-th block in turn); 1 runs them one after
// another. The sanitizer drivers (check.cpp) set more, so TSan sees races between blocks,
// but only between blocks that run at once: two whose linear indices (x fastest) differ by a
// multiple of concurrent_blocks run in one slot, one after the other.
inline unsigned concurrent_blocks = 1;

// Windows, for running the far end of inputs too large to emulate whole (tests set them): a
// launch of the kernel named K (its name without template arguments) skips the blocks whose
// index is below first_block[K] in x, y or z (in y, a cluster runs whole: from the start of
// the one that holds first_block[K].y), and before it the buffer zero_before[K] is zeroed (a
// workspace whose skipped splits must add nothing). Kernels not named run whole.
struct Buffer {
  void* p;
  size_t bytes;
};
inline std::map<std::string, dim3, std::less<>> first_block;
inline std::map<std::string, Buffer, std::less<>> zero_before;

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to launch(grid, block, smem, stream,
// &kernel, [&] { kernel(args); }, 1u, "kernel"); cudaLaunchKernelEx to launch_kernel_ex, which
// calls it with its cluster dimension (1 x cluster_y x 1 blocks; the kernels use no other
// shape). Synchronous: the launch is over when this returns. The blocks of a cluster run at
// once, clusters one after another; without clusters, concurrent_blocks blocks at a time.
template <typename F>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t, const void* kernel,
            F body, unsigned cluster_y, std::string_view name) {
  const unsigned long threads = static_cast<unsigned long>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.y != 1 || block.z != 1 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || cluster_y == 0 ||
      cluster_y > kMaxClusterSize || grid.y % cluster_y != 0) {
    last_error = cudaErrorInvalidConfiguration;  // (2-D blocks: unused here)
    return;
  }
  if (cluster_y > 1 && refuse_clusters) {
    last_error = cudaErrorInvalidClusterSize;
    return;
  }
  if (cluster_y > 1) ++cluster_launches;
  const auto optin = smem_optin.find(kernel);
  if (dynamic_smem > (optin != smem_optin.end() ? optin->second : kDefaultDynamicSmem)) {
    last_error = cudaErrorInvalidValue;  // over the kernel's opt-in (what the GPU reports)
    return;
  }
  const auto window = first_block.find(name);
  const dim3 first = window != first_block.end() ? window->second : dim3(0, 0, 0);
  if (const auto z = zero_before.find(name); z != zero_before.end())
    std::memset(z->second.p, 0, z->second.bytes);
  gridDim = grid;
  blockDim = block;
  dynamic_smem_bytes = dynamic_smem;
  // The blocks to run (the window's, clusters whole) as units u = 0 .. n-1 in index order, x
  // fastest; a unit is one block, or the first block of a cluster.
  const unsigned y0 = first.y / cluster_y * cluster_y;
  const uint64_t nx = grid.x > first.x ? grid.x - first.x : 0;
  const uint64_t ny = grid.y > y0 ? (grid.y - y0) / cluster_y : 0;
  const uint64_t nz = grid.z > first.z ? grid.z - first.z : 0;
  const uint64_t n = nx * ny * nz;
  const auto unit = [&](uint64_t u) {
    if (reverse_blocks) u = n - 1 - u;
    return dim3(first.x + unsigned(u % nx), y0 + unsigned(u / nx % ny) * cluster_y,
                first.z + unsigned(u / (nx * ny)));
  };
  // Slots: the blocks that run at once. A cluster's blocks run every unit together (slot q is
  // rank q); without clusters, slot q runs units q, q + slots, ... on its own.
  const bool clustered = cluster_y > 1;
  const unsigned slots = clustered ? cluster_y
                                   : unsigned(std::clamp<uint64_t>(concurrent_blocks, 1,
                                                                   std::max<uint64_t>(n, 1)));
  struct AlignedDelete {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(128)); }
  };
  const auto alloc = [](size_t bytes) {
    return std::unique_ptr<unsigned char[], AlignedDelete>(
        bytes > 0 ? new (std::align_val_t(128)) unsigned char[bytes] : nullptr);
  };
  std::vector<std::unique_ptr<unsigned char[], AlignedDelete>> dyn, stat;
  // Barrier is not movable: deques. A cluster's barrier spans its blocks; without clusters
  // each slot is a cluster of one. The end of each cluster is a barrier of its own (blocks
  // that ran different numbers of cluster barriers hang in the kernel's, as on a GPU, and
  // abort).
  std::deque<Barrier> barriers, cluster_barriers;
  std::deque<Cluster> clusters;
  Barrier cluster_end(static_cast<unsigned>(threads) * cluster_y);
  for (unsigned q = 0; q < slots; ++q) {
    dyn.push_back(alloc(dynamic_smem));
    stat.push_back(alloc(kMaxStaticSmem));
    EMU_ASAN_POISON(stat.back().get(), kMaxStaticSmem);  // static_shared unpoisons its arrays
    barriers.emplace_back(static_cast<unsigned>(threads));
    if (!clustered || q == 0) {
      cluster_barriers.emplace_back(static_cast<unsigned>(threads) * cluster_y);
      clusters.push_back(Cluster{cluster_y, {}, &cluster_barriers.back()});
    }
    clusters.back().smem.push_back(dyn.back().get());
  }
  thread_pool.run(static_cast<unsigned>(threads) * slots, [&](unsigned i) {
    const unsigned q = i / static_cast<unsigned>(threads);
    const unsigned t = i % static_cast<unsigned>(threads);
    threadIdx = dim3(t, 0, 0);
    block_barrier = &barriers[q];
    block_static_smem = stat[q].get();
    cluster = &clusters[clustered ? 0 : q];
    cluster_rank = clustered ? q : 0;
    for (uint64_t u = clustered ? 0 : q; u < n; u += clustered ? 1 : slots) {
      const dim3 b = unit(u);
      blockIdx = dim3(b.x, b.y + (clustered ? q : 0), b.z);
      block_static_used = 0;
      block_static_arrays.clear();
      body();
      async_open.clear();  // copies the block never waited for never land
      async_committed.clear();
      if (cluster_arrived) fail("block exits between a cluster arrive and its wait");
      // The block is over for every thread before its shared memory is reused. In a
      // cluster, its shared memory is gone when it exits (poisoned: a remote read after
      // that, not ordered by a cluster barrier, is a race), and the next cluster starts
      // when every block of this one is over.
      block_barrier->wait();
      if (t == 0) EMU_ASAN_POISON(stat[q].get(), kMaxStaticSmem);
      if (clustered) {
        if (t == 0 && dyn[q] != nullptr) std::memset(dyn[q].get(), 0xFF, dynamic_smem);
        cluster_end.wait();
      }
    }
    block_barrier = nullptr;
    block_static_smem = nullptr;
    cluster = nullptr;
  });
  for (auto& buf : stat) EMU_ASAN_UNPOISON(buf.get(), kMaxStaticSmem);
  dynamic_smem_bytes = 0;
}
}  // namespace emu

// ---- thread-block clusters (crt/sm_90_rt.h) -------------------------------------------------
inline unsigned __clusterRelativeBlockRank() { return emu::cluster_rank; }
inline void __cluster_barrier_arrive() {
  if (emu::cluster_arrived) emu::fail("__cluster_barrier_arrive twice without a wait");
  emu::cluster_phase = emu::cluster->barrier->arrive();
  emu::cluster_arrived = true;
}
inline void __cluster_barrier_wait() {
  if (!emu::cluster_arrived) emu::fail("__cluster_barrier_wait without an arrive");
  emu::cluster->barrier->wait(emu::cluster_phase);
  emu::cluster_arrived = false;
}
// The address of the same byte of the dynamic shared memory of the cluster's block `rank`
// (the kernels map only dynamic shared memory).
inline void* __cluster_map_shared_rank(const void* p, unsigned rank) {
  const emu::Cluster& cl = *emu::cluster;
  const auto* b = static_cast<const unsigned char*>(p);
  const unsigned char* own = cl.smem[emu::cluster_rank];
  if (rank >= cl.size) emu::fail("__cluster_map_shared_rank: rank outside the cluster");
  if (own == nullptr || b < own || b >= own + emu::dynamic_smem_bytes)
    emu::fail("__cluster_map_shared_rank: not this block's dynamic shared memory");
  return cl.smem[rank] + (b - own);
}

// ---- cudaLaunchKernelEx with a cluster dimension (the one launch attribute emulated) -------
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
namespace emu {
// The rewrite turns cudaLaunchKernelEx(cfg, kernel, ...) into this with the kernel's name.
template <typename... P, typename... A>
cudaError_t launch_kernel_ex(std::string_view name, const cudaLaunchConfig_t* cfg,
                             void (*kernel)(P...), A&&... args) {
  unsigned cluster_y = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    const cudaLaunchAttribute& a = cfg->attrs[i];
    if (a.id != cudaLaunchAttributeClusterDimension || a.val.clusterDim.x != 1 ||
        a.val.clusterDim.z != 1)
      return cudaErrorInvalidValue;  // (not emulated)
    cluster_y = a.val.clusterDim.y;
  }
  launch(cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cfg->stream,
         reinterpret_cast<const void*>(kernel), [&] { kernel(P(args)...); }, cluster_y, name);
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
}  // namespace emu

// The emulated device and binary, as far as forward_max_cluster (mix_forward_cluster.cu) and
// bindings.cpp ask: a device of 132 SMs (an H100 / H200) with cluster launch whose binaries were
// compiled for sm_90 (all settable by tests).
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrClusterLaunch = 120 };
struct cudaFuncAttributes {
  int binaryVersion, ptxVersion;
};
namespace emu {
inline int multiprocessor_count = 132;
inline int device_cluster_launch = 1;
inline int ptx_arch = 90, binary_arch = 90;  // e.g. 80 / 90: sm_80 PTX JIT-compiled for sm_90
}  // namespace emu
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::multiprocessor_count; return cudaSuccess;
    case cudaDevAttrClusterLaunch: *value = emu::device_cluster_launch; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K*) {
  attr->ptxVersion = emu::ptx_arch;
  attr->binaryVersion = emu::binary_arch;
  return cudaSuccess;
}

template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > emu::kMaxDynamicSmemOptin)
    return cudaErrorInvalidValue;
  emu::smem_optin[reinterpret_cast<const void*>(kernel)] = size_t(value);
  return cudaSuccess;
}

inline void __syncthreads() { emu::syncthreads(); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
  }
  return "unknown error";
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes != 0 && p == nullptr) return cudaErrorInvalidValue;
  if (bytes != 0) std::memset(p, value, bytes);
  return cudaSuccess;
}

// CUDA's device min / max are overloaded for every integer width; one template covers the uses.
template <typename A, typename B>
constexpr auto min(A a, B b) -> decltype(a + b) {
  return a < b ? a : b;
}
template <typename A, typename B>
constexpr auto max(A a, B b) -> decltype(a + b) {
  return a < b ? b : a;
}

// ---- 16-bit floats: storage types with round-to-nearest-even conversions -----------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE round-to-nearest-even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (std::isnan(v)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

// ---- WMMA ---------------------------------------------------------------------------------------
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  float v[16][16];  // [row][col] of the tile; a lane fills and uses only what it owns
};
// The accumulator holds only the lane's own elements, as on the GPU (num_elements and x[] are
// public there too: elementwise updates of every element, e.g. a scale, are layout-free).
template <int M, int N, int K, typename T, typename Layout>
struct fragment<accumulator, M, N, K, T, Layout> {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  static constexpr int num_elements = 8;
  float x[num_elements];  // element m is (own_row(m), own_col()) of the tile
};

namespace detail {
inline int lane() { return static_cast<int>(threadIdx.x % 32); }
// Rows of the accumulator this lane owns: lane / 16 + 2m, m < 8; its column: lane % 16.
inline int own_row(int m) { return lane() / 16 + 2 * m; }
inline int own_col() { return lane() % 16; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_f(float v) { return v; }
template <typename T>
void check(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail(what);  // 256-bit aligned pointer
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail(what);               // ldm: a multiple of 16 B
}
}  // namespace detail

template <typename T, typename L>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& a, const T* p,
                             unsigned ldm) {
  detail::check(p, ldm, "wmma::load_matrix_sync(matrix_a): misaligned pointer or ldm");
  for (int m = 0; m < 8; ++m) {
    const int i = detail::own_row(m);
    for (int k = 0; k < 16; ++k) a.v[i][k] = detail::to_f(p[i * ldm + k]);
  }
}

template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& b, const T* p,
                             unsigned ldm) {
  detail::check(p, ldm, "wmma::load_matrix_sync(matrix_b): misaligned pointer or ldm");
  const int n = detail::own_col();
  for (int k = 0; k < 16; ++k) b.v[k][n] = detail::to_f(p[n * ldm + k]);  // element (k, n)
}

template <typename T>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  const int n = detail::own_col();
  for (int m = 0; m < 8; ++m) {
    const int i = detail::own_row(m);
    float acc = c.x[m];
    for (int k = 0; k < 16; ++k) acc = std::fma(a.v[i][k], b.v[k][n], acc);
    d.x[m] = acc;
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& c,
                              unsigned ldm, layout_t layout) {
  detail::check(p, ldm, "wmma::store_matrix_sync: misaligned pointer or ldm");
  const int n = detail::own_col();
  for (int m = 0; m < 8; ++m) {
    const int i = detail::own_row(m);
    (layout == mem_row_major ? p[i * ldm + n] : p[n * ldm + i]) = c.x[m];
  }
}
}  // namespace nvcuda::wmma
