// CPU feature_drop (OPM's feed-forward feature dropping, mmgrad.reference.feature_drop).
//
// keep[i, m] = u(seed, counter + i * M + m) >= drop_prob[m], with u the 24-bit uniform of the first
// Philox4x32-10 output word; out[i, cols of m] = keep[i, m] ? z[i, cols of m] * scale : 0. Each
// draw depends on its index only, so the mask is the same for every thread count and backend.
// Rows are split across threads; per row, M scalar Philox calls then one pass over D columns.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/philox.h"

namespace mmgrad {
namespace cpu {
namespace {

constexpr int64_t kRowTaskElems = int64_t(1) << 15;  // elements per parallel task, roughly

// out[c] = keep ? T(acc(z[c]) * sc) : 0 over one row segment.
template <typename T, typename Acc>
inline void scale_row(const T* z, T* out, int64_t n, bool keep, Acc sc) {
  if (!keep) {
    std::fill(out, out + n, T(0));
    return;
  }
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<T>(static_cast<Acc>(z[c]) * sc);
}

std::tuple<at::Tensor, at::Tensor> feature_drop(const at::Tensor& z, at::IntArrayRef widths,
                                                const at::Tensor& drop_prob, const at::Tensor& seed,
                                                const at::Tensor& counter) {
  const char* op = "mmgrad_C::feature_drop";
  TORCH_CHECK(z.device().is_cpu(), op, ": z must be a CPU tensor, got device ", z.device());
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D (N samples x D features), got shape ", z.sizes());
  dtype_index(z, op, "z");
  const int64_t N = z.size(0), D = z.size(1), M = static_cast<int64_t>(widths.size());
  TORCH_CHECK(D <= 1 || z.stride(1) == 1, op, ": z's columns must be unit-stride, got strides ",
              z.strides());
  int64_t total = 0;
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(widths[m] >= 0, op, ": widths must be non-negative, got ", widths);
    total += widths[m];
  }
  TORCH_CHECK(total == D, op, ": widths ", widths, " add up to ", total, ", not z's ", D,
              " columns");
  TORCH_CHECK(drop_prob.device().is_cpu(), op, ": drop_prob must be a CPU tensor, got device ",
              drop_prob.device());
  TORCH_CHECK(drop_prob.scalar_type() == at::kDouble && drop_prob.dim() == 1 &&
                  drop_prob.size(0) == M,
              op, ": drop_prob must be a float64 tensor of shape (", M, ",), got ",
              drop_prob.scalar_type(), " of shape ", drop_prob.sizes());
  const uint64_t key = philox_word(seed, op, "seed");
  const int64_t base = static_cast<int64_t>(philox_word(counter, op, "counter"));

  const at::Tensor p_t = drop_prob.contiguous();
  const double* p = p_t.data_ptr<double>();
  // theta = sum_m widths[m] * p[m] / D, summed in order in double as the reference does.
  double theta = 0.0;
  for (int64_t m = 0; m < M; ++m) theta = theta + static_cast<double>(widths[m]) * p[m];
  if (D > 0) theta = theta / static_cast<double>(D);
  const double scale = theta < 1.0 ? 1.0 / (1.0 - theta) : 0.0;  // everything dropped: 0, not inf

  std::vector<int64_t> start(M + 1, 0);
  for (int64_t m = 0; m < M; ++m) start[m + 1] = start[m] + widths[m];

  at::Tensor out = at::empty({N, D}, z.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor keep = at::empty({N, M}, z.options().dtype(at::kBool));
  if (N == 0) return {out, keep};
  bool* kp = keep.data_ptr<bool>();
  const int64_t ldz = N > 1 ? z.stride(0) : D;
  const int64_t grain = std::max<int64_t>(1, kRowTaskElems / std::max<int64_t>(D + M, 1));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "feature_drop", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t sc = static_cast<acc_t>(scale);
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        for (int64_t m = 0; m < M; ++m) {
          const uint64_t index = static_cast<uint64_t>(base + i * M + m);
          const double u = static_cast<double>(philox_r0(index, key) >> 8) * 0x1p-24;
          const bool k = u >= p[m];
          kp[i * M + m] = k;
          scale_row<scalar_t, acc_t>(zp + i * ldz + start[m], op_ + i * D + start[m], widths[m], k,
                                     sc);
        }
      }
    });
  });
  return {out, keep};
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("feature_drop", &mmgrad::cpu::feature_drop);
}
