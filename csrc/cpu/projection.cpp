// CPU PCGrad and GradVac coefficient loops (mmgrad.aggregators.projection).
//
// Both methods keep each modified gradient g_i' as row i of a K x K coefficient matrix C
// (g_i' = C_i J), so every dot product is Gram algebra. Row i visits the other rows in the order
// order[i, 0..K-1] and each step depends on the previous one, but the K rows never read each other:
// the torch solvers run the K rows side by side, one step t at a time, while here each row runs its
// K steps to the end before the next row starts (same arithmetic, row by row). The per-step formulas,
// masks and clamps are those of the torch solvers, so the results agree to rounding; only the order
// of the K-term sums differs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "cpu/small_dense.h"

namespace mmgrad {
namespace cpu {
namespace {

// Rows per parallel task: one task below ~2^20 multiply-adds (K^2 per row), where waking the
// thread pool costs more than the loop.
int64_t rows_per_task(int64_t K) { return std::max<int64_t>(1, (int64_t(1) << 20) / (K * K)); }

// G (K, K) float64 and order (K, K) int64 with entries in [0, K); returns K.
int64_t check_inputs(const at::Tensor& G, const at::Tensor& order, const char* op) {
  TORCH_CHECK(G.device().is_cpu(), op, ": G must be a CPU tensor, got device ", G.device());
  TORCH_CHECK(G.scalar_type() == at::kDouble, op, ": G must be float64, got ", G.scalar_type());
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1) && G.size(0) >= 1, op,
              ": G must be a square (K, K) matrix with K >= 1, got shape ", G.sizes());
  const int64_t K = G.size(0);
  TORCH_CHECK(order.device().is_cpu(), op, ": order must be a CPU tensor, got device ",
              order.device());
  TORCH_CHECK(order.scalar_type() == at::kLong, op, ": order must be int64, got ",
              order.scalar_type());
  TORCH_CHECK(order.dim() == 2 && order.size(0) == K && order.size(1) == K, op,
              ": order must have G's shape (", K, ", ", K, "), got ", order.sizes());
  return K;
}

// Reads order into a contiguous buffer, checking every index (an out-of-range index would read
// outside G).
at::Tensor checked_order(const at::Tensor& order, int64_t K, const char* op) {
  at::Tensor o = order.contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  for (int64_t n = 0; n < K * K; ++n)
    TORCH_CHECK(p[n] >= 0 && p[n] < K, op, ": order entries must be in [0, ", K, "), got ", p[n],
                " at (", n / K, ", ", n % K, ")");
  return o;
}

// PCGrad: for j = order[i, t] != i, if inner = g_i' . g_j = C_i G_j < 0 and G_jj > 0,
// C[i, j] -= inner / G_jj.
at::Tensor pcgrad_coefficients(const at::Tensor& G_in, const at::Tensor& order_in) {
  const char* op = "mmgrad_C::pcgrad_coefficients";
  const int64_t K = check_inputs(G_in, order_in, op);
  const at::Tensor order = checked_order(order_in, K, op);
  const at::Tensor G = G_in.contiguous();
  at::Tensor C = at::eye(K, G.options());
  const double* g = G.data_ptr<double>();
  const int64_t* ord = order.data_ptr<int64_t>();
  double* c = C.data_ptr<double>();
  at::parallel_for(0, K, rows_per_task(K), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double* ci = c + i * K;
      for (int64_t t = 0; t < K; ++t) {
        const int64_t j = ord[i * K + t];
        if (j == i) continue;
        const double inner = dot(ci, g + j * K, K);  // G symmetric: row j is column j
        const double dj = g[j * K + j];
        if (inner < 0 && dj > 0) ci[j] += -inner / dj;
      }
    }
  });
  return C;
}

// GradVac (torchjd 0.18 GradVacWeighting): for j = order[i, t] != i, phi = cos(g_i', g_j); if
// phi < phi_t[i, j] add w g_j to g_i'; then phi_t[i, j] <- (1 - beta) phi_t[i, j] + beta phi.
// cG row i holds g_i' . g_k for every k, updated with each added multiple of g_j.
std::tuple<at::Tensor, at::Tensor> gradvac_coefficients(const at::Tensor& G_in,
                                                        const at::Tensor& order_in,
                                                        const at::Tensor& phi_t_in, double beta,
                                                        double eps) {
  const char* op = "mmgrad_C::gradvac_coefficients";
  const int64_t K = check_inputs(G_in, order_in, op);
  TORCH_CHECK(phi_t_in.device().is_cpu() && phi_t_in.scalar_type() == at::kDouble, op,
              ": phi_t must be a float64 CPU tensor, got ", phi_t_in.scalar_type(), " on ",
              phi_t_in.device());
  TORCH_CHECK(phi_t_in.dim() == 2 && phi_t_in.size(0) == K && phi_t_in.size(1) == K, op,
              ": phi_t must have G's shape (", K, ", ", K, "), got ", phi_t_in.sizes());
  const at::Tensor order = checked_order(order_in, K, op);
  const at::Tensor G = G_in.contiguous();
  at::Tensor C = at::eye(K, G.options());
  at::Tensor cG = G.clone();
  at::Tensor phi_t = phi_t_in.clone(at::MemoryFormat::Contiguous);
  const double* g = G.data_ptr<double>();
  const int64_t* ord = order.data_ptr<int64_t>();
  double* c = C.data_ptr<double>();
  double* cg = cG.data_ptr<double>();
  double* target = phi_t.data_ptr<double>();
  at::parallel_for(0, K, rows_per_task(K), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double* ci = c + i * K;
      double* cgi = cg + i * K;
      for (int64_t t = 0; t < K; ++t) {
        const int64_t j = ord[i * K + t];
        if (j == i) continue;  // the torch step leaves C, cG and phi_t unchanged
        const double norm_i = std::sqrt(std::max(dot(cgi, ci, K), 0.0));
        const double norm_j = std::sqrt(std::max(g[j * K + j], 0.0));
        const double phi = cgi[j] / (norm_i * norm_j + eps);
        const double hat = target[i * K + j];
        if (phi < hat) {
          const double s_phi = std::sqrt(std::max(1 - phi * phi, 0.0));
          const double s_hat = std::sqrt(std::max(1 - hat * hat, 0.0));
          const double w = norm_i * (hat * s_phi - phi * s_hat) / (norm_j * s_hat + eps);
          ci[j] += w;
          const double* gj = g + j * K;
          for (int64_t k = 0; k < K; ++k) cgi[k] += w * gj[k];
        }
        target[i * K + j] = (1 - beta) * hat + beta * phi;
      }
    }
  });
  return {C, phi_t};
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("pcgrad_coefficients", &mmgrad::cpu::pcgrad_coefficients);
  m.impl("gradvac_coefficients", &mmgrad::cpu::gradvac_coefficients);
}
