// CPU trace_normalized: the solvers' input, G / trace(G) in float64 plus reg on the diagonal
// (mmgrad.aggregators.base.normalized). One op instead of the six to eight small torch ops of
// the torch path, whose dispatch cost more than the K x K solve itself.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

namespace mmgrad {
namespace cpu {
namespace {

// As base.normalize_trace: the zero matrix when the trace is <= eps or not finite. The trace adds
// the diagonal in index order.
at::Tensor trace_normalized(const at::Tensor& G_in, double eps, double reg) {
  const char* op = "mmgrad_C::trace_normalized";
  TORCH_CHECK(G_in.device().is_cpu(), op, ": G must be a CPU tensor, got device ", G_in.device());
  TORCH_CHECK(G_in.dim() == 2 && G_in.size(0) == G_in.size(1) && G_in.size(0) >= 1, op,
              ": G must be a square (K, K) matrix with K >= 1, got shape ", G_in.sizes());
  TORCH_CHECK(at::isFloatingType(G_in.scalar_type()), op, ": G must be floating point, got ",
              G_in.scalar_type());
  const int64_t K = G_in.size(0);
  at::Tensor out = G_in.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
  double* g = out.data_ptr<double>();
  double t = 0.0;
  for (int64_t i = 0; i < K; ++i) t += g[i * K + i];
  if (t > eps && std::isfinite(t)) {
    for (int64_t i = 0; i < K * K; ++i) g[i] /= t;
  } else {
    out.zero_();
  }
  if (reg != 0.0)
    for (int64_t i = 0; i < K; ++i) g[i * K + i] += reg;
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("trace_normalized", &mmgrad::cpu::trace_normalized);
}
