// Reuse of large CPU output buffers across calls.
//
// A fresh multi-megabyte tensor from the CPU allocator is new memory from the OS: its first write
// page-faults every 4 KiB page (about 30 ms for 64 MiB here), which costs more than the op that
// fills it (combine over K = 2 rows of 16M floats: 3.5 ms). Blocks of freed pooled tensors are kept
// (64-byte aligned, at most kPoolBytes in all, the oldest released first) and handed to the next
// output of the same size, already faulted in.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace mmgrad {
namespace cpu {

// Outputs smaller than this come from at::empty (their faults are cheap and malloc reuses them).
constexpr size_t kPoolMinBytes = size_t(8) << 20;
// The most memory the pool keeps after the tensors using it were freed.
constexpr size_t kPoolBytes = size_t(1) << 30;

// An uninitialised contiguous CPU tensor, from the pool when it is large.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace mmgrad
