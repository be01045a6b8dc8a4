// c10's current CUDA stream, emulated on the CPU (see ../../../emu.h): launches are synchronous
// there, so every call gets the default stream.
#pragma once
#include <cuda_runtime_api.h>

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
