// Host-side checks shared by the CPU kernels (csrc/cpu/) and the CUDA launchers (csrc/cuda/).
#pragma once

#include <ATen/ATen.h>

namespace mmgrad {

// float64 for float64 data, float32 for the 16- and 32-bit float dtypes.
inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A segment table: offsets and numels are int64, 1-D, of the same length, and on `device` (that of
// the data they index). Their values are checked where they are read.
inline void check_segment_table(const at::Tensor& offsets, const at::Tensor& numels,
                                const at::Device& device, const char* op) {
  for (const at::Tensor* p : {&offsets, &numels}) {
    const char* arg = p == &offsets ? "offsets" : "numels";
    TORCH_CHECK(p->device() == device, op, ": ", arg, " must be on ", device,
                " like the data, got ", p->device());
    TORCH_CHECK(p->scalar_type() == at::kLong, op, ": ", arg, " must be int64, got ",
                p->scalar_type());
    TORCH_CHECK(p->dim() == 1, op, ": ", arg, " must be 1-D, got shape ", p->sizes());
  }
  TORCH_CHECK(offsets.numel() == numels.numel(), op,
              ": offsets and numels must have the same length, got ", offsets.numel(), " and ",
              numels.numel());
}

}  // namespace mmgrad
