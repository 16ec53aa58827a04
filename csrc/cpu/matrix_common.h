// Host-side helpers shared by gram.cpp and combine.cpp.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "cpu/kernels.h"

#ifdef __linux__
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
