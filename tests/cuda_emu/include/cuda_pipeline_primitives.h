// The CUDA header of this name, emulated on the CPU: see ../emu.h. An async copy is issued into
// this thread's open group, and its destination is filled with the 0xFF poison (NaN in fp32,
// fp16 and bf16) at once; __pipeline_commit closes the group, and __pipeline_wait_prior(n)
// lands every committed group but the n newest (in order), which is when the bytes arrive. So
// a stage read before its copies were waited for reads NaN, and a read before the barrier
// that orders it after the other threads' waits is a ThreadSanitizer race. Copies a block
// never waits for never land (emu::launch drops them at the block's end). Misaligned
// addresses abort, and a copy reads only the 16 - zfill bytes the hardware reads, when it
// lands (AddressSanitizer checks them).
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
  std::memset(dst, 0xFF, size_and_align);
  emu::async_open.push_back({dst, src, size_and_align, zfill});
}
inline void __pipeline_commit() {
  emu::async_committed.push_back(std::move(emu::async_open));
  emu::async_open.clear();
}
inline void __pipeline_wait_prior(size_t prior) {
  while (emu::async_committed.size() > prior) {
    for (const emu::AsyncCopy& c : emu::async_committed.front()) {
      std::memcpy(c.dst, c.src, c.size - c.zfill);
      std::memset(static_cast<char*>(c.dst) + (c.size - c.zfill), 0, c.zfill);
    }
    emu::async_committed.pop_front();
  }
}
