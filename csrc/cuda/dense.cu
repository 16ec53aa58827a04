// CUDA launchers of the matrix ops on J (K, P): gram, combine, segment_gram, segment_combine_
// (kernels in kernels/gram.cuh and kernels/combine.cuh). Every launch goes to the current stream,
// workspaces come from the caching allocator, and nothing waits for the device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda/launch.h"
#include "kernels/combine.cuh"
#include "kernels/gram.cuh"

namespace mmgrad {
namespace cuda {
namespace {

constexpr int64_t kMaxGramTiles = 1024;      // gram: at most this many column tiles (partials)
constexpr int64_t kSegmentTile = 16384;      // segment ops: columns per tile
constexpr int64_t kMaxGridY = 65535;

// Rows per register block of the gram kernels: K rounded up to a power of two, at most 8 (4 for
// float64, whose accumulators take twice the registers).
template <typename T>
int gram_row_block(int64_t K) {
  const int cap = sizeof(T) == 8 ? 4 : 8;
  int rb = 1;
  while (rb < K && rb < cap) rb *= 2;
  return rb;
}

template <typename T, int RB>
void launch_gram_partial(dim3 grid, const at::Tensor& J, int64_t K, int64_t NB,
                         const TileTable& tt, bool pairs_on_x, at::Tensor& part) {
  gram_partial_kernel<T, RB><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(J.data_ptr()), row_stride(J), K, NB, tt, rows_aligned(J),
      pairs_on_x, part.data_ptr<acc_t<T>>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Phase 1 over the tiles of tt (dense: pairs on grid x, tiles on y; segmented: the reverse).
template <typename T>
void gram_partials(const at::Tensor& J, const TileTable& tt, int64_t ntiles, bool dense,
                   at::Tensor& part, const char* op) {
  const int64_t K = J.size(0);
  const int rb = gram_row_block<T>(K);
  const int64_t NB = ceil_div(K, rb);
  const int64_t npairs = NB * (NB + 1) / 2;
  const int64_t nx = dense ? npairs : ntiles, ny = dense ? ntiles : npairs;
  TORCH_CHECK(nx <= std::numeric_limits<int32_t>::max() && ny <= kMaxGridY, op, ": K = ", K,
              " needs ", npairs, " row-block pairs per tile, more than one launch can hold");
  const dim3 grid(static_cast<unsigned>(nx), static_cast<unsigned>(ny));
  switch (rb) {
    case 1:
      return launch_gram_partial<T, 1>(grid, J, K, NB, tt, dense, part);
    case 2:
      return launch_gram_partial<T, 2>(grid, J, K, NB, tt, dense, part);
    case 4:
      return launch_gram_partial<T, 4>(grid, J, K, NB, tt, dense, part);
    default:
      if constexpr (sizeof(T) < 8) return launch_gram_partial<T, 8>(grid, J, K, NB, tt, dense, part);
  }
}

at::Tensor gram(const at::Tensor& J) {
  const char* op = "mmgrad_C::gram";
  check_J(J, op);
  const c10::cuda::CUDAGuard guard(J.device());
  const int64_t K = J.size(0), P = J.size(1);
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  if (K == 0 || P == 0) return at::zeros({K, K}, J.options().dtype(acc));
  at::Tensor out = at::empty({K, K}, J.options().dtype(acc));
  dispatch_float(J, op, "J", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Tiles are whole sweeps of the block (kThreads groups of V columns); their number depends on
    // (P, dtype) only, so the rounding never depends on the device.
    const int64_t sweep = int64_t(kThreads) * vec_width<T>();
    const int64_t nsweeps = ceil_div(P, sweep);
    const int64_t per_tile = ceil_div(nsweeps, std::min(nsweeps, kMaxGramTiles));
    const int64_t width = per_tile * sweep;
    const int64_t ntiles = ceil_div(P, width);
    const int64_t ntri = K * (K + 1) / 2;
    const TileTable tt{nullptr, nullptr, nullptr, 1, P, width};
    at::Tensor part = at::empty({ntiles * ntri}, out.options());
    gram_partials<T>(J, tt, ntiles, true, part, op);
    reduce_tiles<acc_t<T>, true>(part, ntiles, tt, 1, ntri, K, out, op);
  });
  return out;
}

at::Tensor combine(const at::Tensor& J, const at::Tensor& w) {
  const char* op = "mmgrad_C::combine";
  check_J(J, op);
  const c10::cuda::CUDAGuard guard(J.device());
  const int64_t K = J.size(0), P = J.size(1);
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  check_on(w, J.device(), op, "w");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == K, op, ": w must have shape (K,) = (", K,
              ",) to match J, got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == acc, op, ": w must be ", acc,
              " (the accumulation dtype of J), got ", w.scalar_type());
  if (K == 0) return at::zeros({P}, J.options());
  at::Tensor out = at::empty({P}, J.options());
  if (P == 0) return out;
  const at::Tensor wc = w.contiguous();
  dispatch_float(J, op, "J", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t blocks = ceil_div(P, int64_t(kThreads) * vec_width<T>());
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": P = ", P,
                " columns exceed the CUDA grid limit");
    combine_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0,
                        c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(J.data_ptr()), row_stride(J), K, wc.data_ptr<acc_t<T>>(),
        reinterpret_cast<T*>(out.data_ptr()), P, rows_aligned(J), aligned16(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor segment_gram(const at::Tensor& J, const at::Tensor& offsets, const at::Tensor& numels) {
  const char* op = "mmgrad_C::segment_gram";
  check_J(J, op);
  const c10::cuda::CUDAGuard guard(J.device());
  const int64_t K = J.size(0), P = J.size(1);
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  SegmentTiles st = segment_tiles(offsets, numels, P, kSegmentTile, J.device(), op);
  const int64_t S = st.table.S;
  if (S == 0 || K == 0) return at::zeros({S, K, K}, J.options().dtype(acc));
  at::Tensor out = at::empty({S, K, K}, J.options().dtype(acc));
  dispatch_float(J, op, "J", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t ntri = K * (K + 1) / 2;
    at::Tensor part = at::empty({st.ntiles * ntri}, out.options());
    gram_partials<T>(J, st.table, st.ntiles, false, part, op);
    reduce_tiles<acc_t<T>, true>(part, st.ntiles, st.table, S, ntri, K, out, op);
  });
  return out;
}

void segment_combine_(const at::Tensor& out, const at::Tensor& J, const at::Tensor& offsets,
                      const at::Tensor& numels, const at::Tensor& weights) {
  const char* op = "mmgrad_C::segment_combine_";
  check_J(J, op);
  const c10::cuda::CUDAGuard guard(J.device());
  const int64_t K = J.size(0), P = J.size(1);
  check_flat(out, op, "out");
  check_on(out, J.device(), op, "out");
  TORCH_CHECK(out.size(0) == P, op, ": out must have P = ", P, " elements, got ", out.size(0));
  TORCH_CHECK(out.scalar_type() == J.scalar_type(), op, ": out must have J's dtype ",
              J.scalar_type(), ", got ", out.scalar_type());
  SegmentTiles st = segment_tiles(offsets, numels, P, kSegmentTile, J.device(), op);
  const int64_t S = st.table.S;
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  check_on(weights, J.device(), op, "weights");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == S && weights.size(1) == K, op,
              ": weights must have shape (S, K) = (", S, ", ", K, "), got ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == acc, op, ": weights must be ", acc,
              " (the accumulation dtype of J), got ", weights.scalar_type());
  if (S == 0 || P == 0) return;
  const at::Tensor wc = weights.contiguous();
  dispatch_float(J, op, "J", [&](auto tag) {
    using T = typename decltype(tag)::type;
    segment_combine_kernel<T><<<static_cast<unsigned>(st.ntiles), kThreads, 0,
                                c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(J.data_ptr()),
        row_stride(J), K, wc.data_ptr<acc_t<T>>(), st.table, rows_aligned(J),
        aligned16(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CUDA, m) {
  m.impl("gram", &mmgrad::cuda::gram);
  m.impl("combine", &mmgrad::cuda::combine);
  m.impl("segment_gram", &mmgrad::cuda::segment_gram);
  m.impl("segment_combine_", &mmgrad::cuda::segment_combine_);
}
