// The CUDA header of this name, emulated on the CPU: see ../emu.h. An async copy happens at
// once (its wait is then a no-op), so a read of a stage before the barrier that should order
// it after every thread's copies is still a ThreadSanitizer race; misaligned addresses abort,
// and the copy reads only the 16 - zfill bytes the hardware reads (AddressSanitizer checks them).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../emu.h"

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align,
                                    size_t zfill = 0) {
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16)
    emu::fail("__pipeline_memcpy_async: size must be 4, 8 or 16");
  if (zfill > size_and_align) emu::fail("__pipeline_memcpy_async: zfill > size");
  if (reinterpret_cast<uintptr_t>(dst) % size_and_align != 0 ||
      reinterpret_cast<uintptr_t>(src) % size_and_align != 0)
    emu::fail("__pipeline_memcpy_async: misaligned address");
  std::memcpy(dst, src, size_and_align - zfill);
  std::memset(static_cast<char*>(dst) + (size_and_align - zfill), 0, zfill);
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}
