// Host-side checks shared by the CPU kernels (csrc/cpu/) and the CUDA launchers (csrc/cuda/).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

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

// Throws if two non-empty segments of a table (host arrays of S entries) overlap: an op that
// writes them would depend on thread timing.
inline void check_disjoint_segments(const int64_t* off, const int64_t* num, int64_t S, const char* op) {
  std::vector<std::pair<int64_t, int64_t>> spans;  // (offset, segment) of the non-empty ones
  spans.reserve(S);
  for (int64_t s = 0; s < S; ++s) {
    if (num[s] > 0) spans.emplace_back(off[s], s);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    const int64_t prev = spans[i - 1].second, cur = spans[i].second;
    TORCH_CHECK(off[cur] >= off[prev] + num[prev], op, ": segments ", prev, " and ", cur,
                " overlap ([", off[prev], ", ", off[prev] + num[prev], ") and [", off[cur], ", ",
                off[cur] + num[cur], "))");
  }
}

}  // namespace mmgrad
