// CUDA launchers of the segment ops on a flat buffer: segment_moments, segment_scale_ (with Philox
// noise) and segment_lerp_ (kernels in kernels/segment.cuh). The segment table, the per-segment
// parameters and the seed are read on the device: no launcher synchronises with the host, and a
// captured CUDA graph replays with the current contents of those tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "kernels/segment.cuh"

namespace mmgrad {
namespace cuda {
namespace {

constexpr int64_t kSegmentTile = 16384;  // elements per tile (one block)

at::Tensor segment_moments(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& numels) {
  const char* op = "mmgrad_C::segment_moments";
  check_flat(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = accumulation_dtype(x.scalar_type());
  SegmentTiles st = segment_tiles(offsets, numels, x.numel(), kSegmentTile, x.device(), op);
  const int64_t S = st.table.S;
  at::Tensor out = at::empty({S, 2}, x.options().dtype(acc));
  dispatch_float(x, op, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (S == 0) return;
    at::Tensor part = at::empty({st.ntiles * 2}, out.options());
    moments_partial_kernel<T><<<static_cast<unsigned>(st.ntiles), kThreads, 0,
                                c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(x.data_ptr()), st.table, aligned16(x.data_ptr()),
        part.data_ptr<acc_t<T>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_tiles<acc_t<T>, false>(part, st.ntiles, st.table, S, 2, 0, out, op);
  });
  return out;
}

void segment_scale_(at::Tensor& x, const at::Tensor& offsets, const at::Tensor& numels,
                    const at::Tensor& scale, const c10::optional<at::Tensor>& noise_std,
                    const c10::optional<at::Tensor>& seed) {
  const char* op = "mmgrad_C::segment_scale_";
  check_flat(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = accumulation_dtype(x.scalar_type());
  SegmentTiles st = segment_tiles(offsets, numels, x.numel(), kSegmentTile, x.device(), op);
  const int64_t S = st.table.S;
  const at::Tensor sc = check_param(scale, S, acc, x.device(), op, "scale");
  at::Tensor sd;
  if (noise_std.has_value()) {
    TORCH_CHECK(seed.has_value(), op, ": seed is required when noise_std is given");
    sd = check_param(*noise_std, S, acc, x.device(), op, "noise_std");
    check_on(*seed, x.device(), op, "seed");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                ": seed must be an int64 tensor with one element, got ", seed->scalar_type(),
                " with ", seed->numel(), " elements");
  }
  dispatch_float(x, op, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (S == 0) return;
    const dim3 grid(static_cast<unsigned>(st.ntiles));
    T* data = reinterpret_cast<T*>(x.data_ptr());
    const bool aligned = aligned16(x.data_ptr());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (sd.defined()) {
      scale_kernel<T, true><<<grid, kThreads, 0, stream>>>(
          data, st.table, sc.data_ptr<acc_t<T>>(), sd.data_ptr<acc_t<T>>(),
          seed->data_ptr<int64_t>(), aligned);
    } else {
      scale_kernel<T, false><<<grid, kThreads, 0, stream>>>(data, st.table,
                                                            sc.data_ptr<acc_t<T>>(), nullptr,
                                                            nullptr, aligned);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void segment_lerp_(at::Tensor& x, const at::Tensor& y, const at::Tensor& offsets,
                   const at::Tensor& numels, const at::Tensor& weight) {
  const char* op = "mmgrad_C::segment_lerp_";
  check_flat(x, op, "x");
  check_flat(y, op, "y");
  const c10::cuda::CUDAGuard guard(x.device());
  check_on(y, x.device(), op, "y");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": y must have x's dtype ", x.scalar_type(),
              ", got ", y.scalar_type());
  TORCH_CHECK(y.numel() == x.numel(), op, ": y must have as many elements as x (", x.numel(),
              "), got ", y.numel());
  const at::ScalarType acc = accumulation_dtype(x.scalar_type());
  SegmentTiles st = segment_tiles(offsets, numels, x.numel(), kSegmentTile, x.device(), op);
  const int64_t S = st.table.S;
  const at::Tensor w = check_param(weight, S, acc, x.device(), op, "weight");
  dispatch_float(x, op, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (S == 0) return;
    lerp_kernel<T><<<static_cast<unsigned>(st.ntiles), kThreads, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<T*>(x.data_ptr()), reinterpret_cast<const T*>(y.data_ptr()), st.table,
        w.data_ptr<acc_t<T>>(), aligned16(x.data_ptr()) && aligned16(y.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CUDA, m) {
  m.impl("segment_moments", &mmgrad::cuda::segment_moments);
  m.impl("segment_scale_", &mmgrad::cuda::segment_scale_);
  m.impl("segment_lerp_", &mmgrad::cuda::segment_lerp_);
}
