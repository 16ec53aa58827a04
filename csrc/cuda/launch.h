// Host-side helpers of the CUDA launchers (dense.cu, segment.cu): argument checks with the same
// messages as the CPU ops, dtype dispatch to the kernels' storage types, and the device-side
// tile map of a segment table. Nothing here reads device memory: the launchers never synchronise.
// Launches go to c10::cuda::getCurrentCUDAStream() (what at::cuda::getCurrentCUDAStream returns),
// from c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h, which would also pull in the
// cuBLAS / cuSPARSE / cuSOLVER headers that a minimal CUDA toolkit does not have.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>

#include "kernels/common.cuh"
#include "segment_table.h"

namespace mmgrad {
namespace cuda {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with the kernels' storage type T of a float tensor.
template <typename F>
void dispatch_float(const at::Tensor& t, const char* op, const char* arg, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return f(Tag<float>{});
    case at::kDouble:
      return f(Tag<double>{});
    case at::kHalf:
      return f(Tag<__half>{});
    case at::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
}

inline void check_on(const at::Tensor& t, const at::Device& device, const char* op, const char* arg) {
  TORCH_CHECK(t.device() == device, op, ": ", arg, " must be on ", device, " like the data, got ",
              t.device());
}

// A 128-bit access at a multiple of the vector width is aligned when the base is.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int vec_width_of(at::ScalarType t) { return 16 / static_cast<int>(c10::elementSize(t)); }

// Validates J (K, P) on a CUDA device.
inline void check_J(const at::Tensor& J, const char* op) {
  TORCH_CHECK(J.is_cuda(), op, ": J must be a CUDA tensor, got device ", J.device());
  TORCH_CHECK(J.dim() == 2, op, ": J must be 2-D (K, P), got shape ", J.sizes());
  TORCH_CHECK(J.size(1) <= 1 || J.stride(1) == 1, op,
              ": J's last dimension must be contiguous (J.stride(1) == 1), got strides ",
              J.strides());
  TORCH_CHECK(J.size(0) <= 1 || J.stride(0) >= 0, op, ": J has a negative row stride");
}

// Row stride of J in elements: a single row may report any stride, and only row 0 is read.
inline int64_t row_stride(const at::Tensor& J) { return J.size(0) > 1 ? J.stride(0) : J.size(1); }

// Whole column groups of every row of J are 16-byte aligned.
inline bool rows_aligned(const at::Tensor& J) {
  return aligned16(J.data_ptr()) &&
         (J.size(0) <= 1 || row_stride(J) % vec_width_of(J.scalar_type()) == 0);
}

// A flat buffer: 1-D, contiguous, float, on CUDA.
inline void check_flat(const at::Tensor& x, const char* op, const char* arg) {
  TORCH_CHECK(x.is_cuda(), op, ": ", arg, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 1, op, ": ", arg, " must be 1-D (a flat buffer), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", arg, " must be contiguous");
}

// Per-segment parameter: (S,) in the accumulation dtype on the data's device; contiguous copy.
inline at::Tensor check_param(const at::Tensor& t, int64_t S, at::ScalarType acc,
                              const at::Device& device, const char* op, const char* arg) {
  check_on(t, device, op, arg);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == S, op, ": ", arg, " must have shape (S,) = (", S,
              ",) like offsets, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", arg, " must be ", acc,
              " (the accumulation dtype of the data), got ", t.scalar_type());
  return t.contiguous();
}

// The tile map of a segment table over a range of n elements (or columns), built on the current
// stream. Shapes only are checked here; the values stay on the device (see common.cuh).
struct SegmentTiles {
  at::Tensor offsets, numels, tile_end;  // keep the device arrays alive until the launches
  TileTable table;
  int64_t ntiles;  // blocks to launch: enough for any table of disjoint segments
};

inline SegmentTiles segment_tiles(const at::Tensor& offsets, const at::Tensor& numels, int64_t n,
                                  int64_t tile, const at::Device& device, const char* op) {
  check_segment_table(offsets, numels, device, op);
  SegmentTiles st;
  st.offsets = offsets.contiguous();
  st.numels = numels.contiguous();
  const int64_t S = offsets.numel();
  st.ntiles = ceil_div(n, tile) + S;
  TORCH_CHECK(st.ntiles <= std::numeric_limits<int32_t>::max(), op, ": ", st.ntiles,
              " tiles exceed the CUDA grid limit");
  st.tile_end = at::empty({S}, offsets.options());
  st.table = TileTable{st.tile_end.data_ptr<int64_t>(), st.offsets.data_ptr<int64_t>(),
                       st.numels.data_ptr<int64_t>(), S, n, tile};
  if (S > 0) {
    tile_scan_kernel<<<1, 1024, 0, c10::cuda::getCurrentCUDAStream()>>>(st.table,
                                                                       st.tile_end.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return st;
}

// Phase 2 of a two-phase reduction into out (see reduce_tiles_kernel).
template <typename A, bool SYM>
void reduce_tiles(const at::Tensor& part, int64_t ntiles, const TileTable& table, int64_t S,
                  int64_t E, int64_t K, at::Tensor& out, const char* op) {
  constexpr int kReduceThreads = 128;
  const int64_t blocks = S * E;
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks,
              " reductions exceed the CUDA grid limit");
  reduce_tiles_kernel<A, SYM, kReduceThreads>
      <<<static_cast<unsigned>(blocks), kReduceThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          part.data_ptr<A>(), ntiles, table, E, K, out.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace mmgrad
