// csrc/bindings.cpp as the emulator compiles it: the extension's real boundary checks,
// allocations and dtype dispatch over the emulated kernels, as a Python module over CPU tensors
// (tests/cuda_emu/__init__.py builds and loads it). On the emulator the device is the CPU, so
// its "is this tensor on the device?" question, `is_cuda()`, asks `is_cpu()` here; c10's CUDA
// guard and stream are the stand-ins of include/c10/cuda.
#include <torch/extension.h>

#define is_cuda is_cpu
#include "bindings.cpp"
