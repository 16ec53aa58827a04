// CPU Nash-MTL Newton solver (mmgrad.aggregators.nash.nash_newton).
//
// Damped Newton on F(a) = a^T G a / 2 - sum log a, whose minimiser solves G a = 1 / a:
//   g = G a - 1 / a,  H = G + diag(1 / a^2),  delta = -H^{-1} g,
//   lambda = sqrt(max(-g . delta, 0)),  step = 1 if lambda < 1/4 else 1 / (1 + lambda),
//   a <- max(a + step delta, 1e-30),
// for at most `iters` iterations: the torch solver's formulas, clamps and budget. H is symmetric
// positive definite (G is a Gramian plus a ridge, 1 / a^2 > 0), so the K x K system is solved by
// Cholesky instead of the LU factorisation torch.linalg.solve uses: half the work, same answer to
// rounding. The torch solver must run its full budget (no branch on a device value); here the loop
// stops once an iteration returns the iterate unchanged, bit for bit, since every later iteration
// would then repeat it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/small_dense.h"

namespace mmgrad {
namespace cpu {
namespace {

at::Tensor nash_newton(const at::Tensor& G_in, const at::Tensor& alpha0, int64_t iters) {
  const char* op = "mmgrad_C::nash_newton";
  TORCH_CHECK(G_in.device().is_cpu(), op, ": G must be a CPU tensor, got device ", G_in.device());
  TORCH_CHECK(G_in.scalar_type() == at::kDouble, op, ": G must be float64, got ",
              G_in.scalar_type());
  TORCH_CHECK(G_in.dim() == 2 && G_in.size(0) == G_in.size(1) && G_in.size(0) >= 1, op,
              ": G must be a square (K, K) matrix with K >= 1, got shape ", G_in.sizes());
  const int64_t K = G_in.size(0);
  TORCH_CHECK(alpha0.device().is_cpu() && alpha0.scalar_type() == at::kDouble, op,
              ": alpha0 must be a float64 CPU tensor, got ", alpha0.scalar_type(), " on ",
              alpha0.device());
  TORCH_CHECK(alpha0.dim() == 1 && alpha0.size(0) == K, op, ": alpha0 must have shape (", K,
              ",), got ", alpha0.sizes());
  TORCH_CHECK(iters >= 0, op, ": iters must be non-negative, got ", iters);

  const at::Tensor G = G_in.contiguous();
  const double* g_mat = G.data_ptr<double>();
  at::Tensor a_out = alpha0.clone(at::MemoryFormat::Contiguous);
  double* a = a_out.data_ptr<double>();
  std::vector<double> H(K * K), grad(K), hinv_grad(K);  // hinv_grad = H^{-1} g = -delta
  for (int64_t it = 0; it < iters; ++it) {
    // grad = G a - 1 / a, G a summed row by row of G (G symmetric) so the inner loop vectorises.
    std::fill(grad.begin(), grad.end(), 0.0);
    for (int64_t j = 0; j < K; ++j) {
      const double* gj = g_mat + j * K;
      for (int64_t i = 0; i < K; ++i) grad[i] += a[j] * gj[i];
    }
    for (int64_t i = 0; i < K; ++i) grad[i] -= 1.0 / a[i];
    std::copy(g_mat, g_mat + K * K, H.begin());
    for (int64_t i = 0; i < K; ++i) H[i * K + i] += 1.0 / (a[i] * a[i]);
    hinv_grad = grad;
    if (cholesky_upper(H.data(), K)) {
      cholesky_solve(H.data(), hinv_grad.data(), K);
    } else {
      // Not numerically positive definite (rounding in a near-singular G): solve as torch does.
      at::Tensor Ht = G.clone();
      Ht.diagonal().add_(a_out.mul(a_out).reciprocal());
      const at::Tensor x = std::get<0>(at::linalg_solve_ex(
          Ht, at::from_blob(grad.data(), {K}, G.options()), /*left=*/true, /*check_errors=*/false));
      std::copy(x.data_ptr<double>(), x.data_ptr<double>() + K, hinv_grad.begin());
    }
    double decrement = 0.0;  // g . H^{-1} g = -(g . delta)
    for (int64_t i = 0; i < K; ++i) decrement += grad[i] * hinv_grad[i];
    const double lam = std::sqrt(std::max(decrement, 0.0));
    const double step = lam < 0.25 ? 1.0 : 1.0 / (1.0 + lam);
    bool unchanged = true;
    for (int64_t i = 0; i < K; ++i) {
      const double next = std::max(a[i] - step * hinv_grad[i], 1e-30);
      unchanged = unchanged && next == a[i];
      a[i] = next;
    }
    if (unchanged) break;
  }
  return a_out;
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) { m.impl("nash_newton", &mmgrad::cpu::nash_newton); }
