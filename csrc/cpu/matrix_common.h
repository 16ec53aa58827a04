// Host-side helpers shared by gram.cpp and combine.cpp.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "cpu/kernels.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace mmgrad {
namespace cpu {

// 64-byte aligned scratch.
struct Scratch {
  void* p = nullptr;
  explicit Scratch(size_t bytes) {
    p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
    TORCH_CHECK(p != nullptr, "mmgrad: out of memory allocating ", bytes, " bytes of scratch");
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Asks for transparent huge pages on a large fresh output before its first touch: with 4 KiB
// pages the page faults cost more than the whole op at small K (40 ms vs 8 ms for 64 MiB here).
// Advice only; ignored where THP is off.
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < int64_t(4) * static_cast<int64_t>(kHuge)) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Validates J (K, P) and returns its dtype index.
inline int check_J(const at::Tensor& J, const char* op) {
  TORCH_CHECK(J.device().is_cpu(), op, ": J must be a CPU tensor, got device ", J.device());
  TORCH_CHECK(J.dim() == 2, op, ": J must be 2-D (K, P), got shape ", J.sizes());
  const int di = dtype_index(J, op, "J");
  TORCH_CHECK(J.size(1) <= 1 || J.stride(1) == 1, op,
              ": J's last dimension must be contiguous (J.stride(1) == 1), got strides ",
              J.strides());
  TORCH_CHECK(J.size(0) <= 1 || J.stride(0) >= 0, op, ": J has a negative row stride");
  return di;
}

}  // namespace cpu
}  // namespace mmgrad
