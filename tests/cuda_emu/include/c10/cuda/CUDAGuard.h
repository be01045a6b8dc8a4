// c10's CUDAGuard, emulated on the CPU (see ../../../emu.h): bindings.cpp makes the tensors'
// device current for a call; the emulator has one device, so there is nothing to switch.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
}  // namespace c10::cuda
