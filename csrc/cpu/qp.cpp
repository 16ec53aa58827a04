// CPU solvers of the aggregators' small QPs: the dual-cone projection (UPGrad, DualProj) and the
// CAGrad dual by a primal-dual active-set method, the min-norm point of the simplex (MGDA) by
// Wolfe's method (mmgrad.aggregators._qp.project_dual_cone / min_norm_simplex,
// cagrad.cagrad_dual).
//
// Same start, same rules (for the active-set solvers _exchange: Judice & Pires block pivoting with
// Murty's backup), same budget, ridge, tolerance and final clamp as the torch solvers, with two
// differences that do not change the result beyond rounding:
//  * the torch face system is G + ridge I on the free block and the identity elsewhere; only the
//    free block is factored here (the fixed coordinates of the solution are the right-hand side);
//  * the torch solvers always run the whole budget because a branch on a tensor would synchronise
//    a GPU stream. Here the loop ends once an iteration would change nothing (an exchange of
//    nothing, Wolfe's stop): the face, and so the solve and the next multipliers, would repeat
//    exactly, so the iterate is already the one the torch loop returns.
// Free blocks of an exactly symmetric G are factored by Cholesky; a non-positive pivot (a face that
// is indefinite by rounding, e.g. near-parallel rows of a float32 Gram) or a G that is not exactly
// symmetric falls back to LU with partial pivoting, the factorisation the torch solve uses.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/small_dense.h"

namespace mmgrad {
namespace cpu {
namespace {

// torch.maximum: NaN if either operand is NaN.
double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return a < b ? b : a;
}

// The exchange rule of mmgrad.aggregators._qp._exchange for one problem. While the number of
// infeasible coordinates keeps dropping (or for `backup` more tries) the whole infeasible set is
// exchanged, otherwise only the infeasible coordinate with the largest index (Murty's rule).
class Pivoting {
 public:
  Pivoting(int64_t K, int64_t backup) : best_(K + 1), tries_(backup), backup_(backup) {}

  // Flips `tight` on the exchanged coordinates; false when nothing is infeasible (the iterate is a
  // fixed point: the torch loop would exchange nothing in every later iteration either).
  bool exchange(const uint8_t* infeasible, uint8_t* tight, int64_t K) {
    int64_t n = 0, last = -1;
    for (int64_t i = 0; i < K; ++i) {
      if (infeasible[i]) {
        ++n;
        last = i;
      }
    }
    if (n == 0) return false;
    const bool better = n < best_;
    if (better || tries_ > 0) {
      for (int64_t i = 0; i < K; ++i) tight[i] ^= infeasible[i];
    } else {
      tight[last] ^= 1;
    }
    tries_ = better ? backup_ : tries_ - 1;
    best_ = std::min(n, best_);
    return true;
  }

 private:
  int64_t best_, tries_;
  const int64_t backup_;
};

// Solves (G_FF + ridge I) x = r on a free set F: Cholesky when G is exactly symmetric and every
// pivot is positive, otherwise LU with partial pivoting. Both factorisations are right-looking, so
// their inner loops are contiguous row updates (a * x + y), which vectorise without reordering
// sums. Scratch for one problem at a time.
class FaceSolver {
 public:
  FaceSolver(const double* G, int64_t K, bool symmetric, double ridge)
      : G_(G), K_(K), symmetric_(symmetric), ridge_(ridge), A_(K * K), piv_(K) {}

  // Factors the block of the n coordinates free[0..n).
  void factor(const int64_t* free, int64_t n) {
    n_ = n;
    cholesky_ = symmetric_ && cholesky(free);
    if (!cholesky_) lu(free);
  }

  // x (n entries, in the order of `free`) <- (G_FF + ridge I)^{-1} x.
  void solve(double* x) const {
    const int64_t n = n_;
    const double* A = A_.data();
    if (cholesky_) {
      cholesky_solve(A, x, n);
      return;
    }
    for (int64_t r = 0; r < n; ++r) std::swap(x[r], x[piv_[r]]);
    for (int64_t r = 0; r < n; ++r) {  // unit lower triangle, column by column
      const double xr = x[r];
      for (int64_t i = r + 1; i < n; ++i) x[i] -= A[i * n + r] * xr;
    }
    for (int64_t r = n - 1; r >= 0; --r) {
      const double* Ur = A + r * n;
      x[r] = (x[r] - dot(Ur + r + 1, x + r + 1, n - r - 1)) / Ur[r];
    }
  }

 private:
  // A_ <- G_FF + ridge I (only its upper triangle when upper_only).
  void gather(const int64_t* free, bool upper_only) {
    const int64_t n = n_;
    double* A = A_.data();
    for (int64_t r = 0; r < n; ++r) {
      const double* Gr = G_ + free[r] * K_;
      double* Ar = A + r * n;
      for (int64_t c = upper_only ? r : 0; c < n; ++c) Ar[c] = Gr[free[c]];
      Ar[r] += ridge_;
    }
  }

  // Upper factor R (R^T R = M) in the upper triangle of A_; false at a pivot that is not
  // positive (or NaN).
  bool cholesky(const int64_t* free) {
    gather(free, true);
    return cholesky_upper(A_.data(), n_);
  }

  // LU with partial pivoting (row swaps recorded LAPACK-style in piv_). An exactly zero pivot is
  // left in place, as getrf does; the solve then divides by it, as the torch solve without error
  // checks does.
  void lu(const int64_t* free) {
    gather(free, false);
    const int64_t n = n_;
    double* A = A_.data();
    for (int64_t k = 0; k < n; ++k) {
      int64_t p = k;
      for (int64_t i = k + 1; i < n; ++i)
        if (std::abs(A[i * n + k]) > std::abs(A[p * n + k])) p = i;
      piv_[k] = p;
      if (p != k) std::swap_ranges(A + k * n, A + k * n + n, A + p * n);
      const double pivot = A[k * n + k];
      if (pivot == 0.0) continue;
      const double* Uk = A + k * n;
      for (int64_t i = k + 1; i < n; ++i) {
        double* Ai = A + i * n;
        const double l = Ai[k] / pivot;
        Ai[k] = l;
        for (int64_t c = k + 1; c < n; ++c) Ai[c] -= l * Uk[c];
      }
    }
  }

  const double* G_;
  const int64_t K_;
  const bool symmetric_;
  const double ridge_;
  std::vector<double> A_;
  std::vector<int64_t> piv_;
  int64_t n_ = 0;
  bool cholesky_ = false;
};

// Factorization work (sum of n^3 over the free blocks) of one dual-cone problem above which the
// remaining problems of a batch are split over threads: a typical K = 64 UPGrad problem (one
// iteration, a free block of ~32) is just above it, K = 32 problems are far below.
constexpr double kSplitWork = 3e4;

// The solver settings every op takes.
struct Budget {
  int64_t iters;
  double ridge, tol;
  int64_t backup;
};

bool all_finite(const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

bool exactly_symmetric(const double* G, int64_t K) {
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < i; ++j)
      if (G[i * K + j] != G[j * K + i]) return false;
  return true;
}

// Indices of the coordinates that are not tight; returns their count. Branch-free (every slot is
// written, the count advances on free ones): the pattern is data-dependent and mispredicted.
// free has room for K entries.
int64_t free_set(const uint8_t* tight, int64_t K, int64_t* free) {
  int64_t n = 0;
  for (int64_t i = 0; i < K; ++i) {
    free[n] = i;
    n += !tight[i];
  }
  return n;
}

// A (K, K) G on the CPU in float64; returns it contiguous.
at::Tensor checked_gram(const at::Tensor& G, const char* op) {
  TORCH_CHECK(G.device().is_cpu(), op, ": G must be a CPU tensor, got device ", G.device());
  TORCH_CHECK(G.scalar_type() == at::kDouble, op, ": G must be float64, got ", G.scalar_type());
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1) && G.size(0) >= 1, op,
              ": G must be a square (K, K) matrix with K >= 1, got shape ", G.sizes());
  return G.contiguous();
}

Budget checked_budget(int64_t iters, double ridge, double tol, int64_t backup, const char* op) {
  TORCH_CHECK(iters >= 0, op, ": iters must be non-negative, got ", iters);
  TORCH_CHECK(backup >= 0, op, ": backup must be non-negative, got ", backup);
  return Budget{iters, ridge, tol, backup};
}

// A point of the simplex from the last iterate, as the torch solvers end: clamp at 0, divide by the
// sum, or the uniform point when nothing positive is left.
at::Tensor normalized_on_simplex(const std::vector<double>& a, const at::TensorOptions& options) {
  const int64_t K = static_cast<int64_t>(a.size());
  at::Tensor out = at::empty({K}, options);
  double* o = out.data_ptr<double>();
  double total = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    o[i] = a[i] < 0.0 ? 0.0 : a[i];  // NaN stays NaN, as clamp
    total += o[i];
  }
  if (total > 0.0) {
    for (int64_t i = 0; i < K; ++i) o[i] /= total;
  } else {
    std::fill(o, o + K, 1.0 / static_cast<double>(K));
  }
  return out;
}

// out[j] = sum_k val[k] * G[idx[k]][j] for all K columns j, summed in order of k, eight columns at
// a time in registers (contiguous rows: vectorised loads, where a dot product per column would
// gather).
void combine_rows(const double* G, int64_t K, const int64_t* idx, const double* val, int64_t m,
                  double* out) {
  constexpr int64_t W = 8;
  int64_t c = 0;
  for (; c + W <= K; c += W) {
    double acc[W] = {};
    for (int64_t k = 0; k < m; ++k) {
      const double* row = G + idx[k] * K + c;
      const double a = val[k];
      for (int64_t j = 0; j < W; ++j) acc[j] += a * row[j];
    }
    for (int64_t j = 0; j < W; ++j) out[c + j] = acc[j];
  }
  for (; c < K; ++c) {
    double acc = 0.0;
    for (int64_t k = 0; k < m; ++k) acc += val[k] * G[idx[k] * K + c];
    out[c] = acc;
  }
}

// The problems of project_dual_cone, min v^T G v s.t. v >= u, one after the other with the same
// scratch. The multipliers are the columns G^T v (the torch solver's V @ G): combinations of the
// rows of G over the nonzero entries of v, which is sparse for UPGrad (u = pref_i e_i, the free set
// about half of K), as is the fixed part of the right-hand side (G is finite: the caller handles
// the other case).
class DualConeSolver {
 public:
  DualConeSolver(const double* G, int64_t K, bool symmetric, const Budget& budget)
      : G_(G), K_(K), budget_(budget), face_(G, K, symmetric, budget.ridge),
        v_(K), x_(K), val_(K), Gv_(K), idx_(K), free_(K), tight_(K), infeasible_(K) {}

  // out <- max(v, u) for the last iterate v.
  void run(const double* u, double* out) {
    const int64_t K = K_;
    double* v = v_.data();
    double* Gv = Gv_.data();
    uint8_t* tight = tight_.data();
    std::fill(tight, tight + K, uint8_t(1));
    std::copy(u, u + K, v);
    Pivoting pivoting(K, budget_.backup);
    for (int64_t it = 0; it < budget_.iters; ++it) {
      combine_rows(G_, K, idx_.data(), val_.data(), support(v), Gv);
      for (int64_t j = 0; j < K; ++j)
        infeasible_[j] = tight[j] ? Gv[j] < -budget_.tol : v[j] < u[j] - budget_.tol;
      if (!pivoting.exchange(infeasible_.data(), tight, K)) break;
      // Fixed coordinates stay at u; the free block solves G_FF v_F = -(G^T u_A)_F.
      for (int64_t j = 0; j < K; ++j) v[j] = tight[j] ? u[j] : 0.0;
      combine_rows(G_, K, idx_.data(), val_.data(), support(v), Gv);
      const int64_t n = free_set(tight, K, free_.data());
      for (int64_t r = 0; r < n; ++r) x_[r] = -Gv[free_[r]];
      face_.factor(free_.data(), n);
      face_.solve(x_.data());
      for (int64_t r = 0; r < n; ++r) v[free_[r]] = x_[r];
      factor_work_ += static_cast<double>(n) * n * n;
    }
    for (int64_t j = 0; j < K; ++j) out[j] = nan_max(v[j], u[j]);
  }

  // Sum of n^3 over the free blocks factored so far (a measure of the work done).
  double factor_work() const { return factor_work_; }

 private:
  // Packs the nonzero entries of x into (idx_, val_); returns their count. Branch-free, as
  // free_set.
  int64_t support(const double* x) {
    int64_t m = 0;
    for (int64_t i = 0; i < K_; ++i) {
      idx_[m] = i;
      val_[m] = x[i];
      m += x[i] != 0.0;
    }
    return m;
  }

  const double* G_;
  const int64_t K_;
  const Budget budget_;
  FaceSolver face_;
  std::vector<double> v_, x_, val_, Gv_;
  std::vector<int64_t> idx_, free_;
  std::vector<uint8_t> tight_, infeasible_;
  double factor_work_ = 0.0;
};

at::Tensor project_dual_cone(const at::Tensor& G_in, const at::Tensor& U_in, int64_t iters,
                             double ridge, double tol, int64_t backup) {
  const char* op = "mmgrad_C::project_dual_cone";
  const at::Tensor G = checked_gram(G_in, op);
  const int64_t K = G.size(0);
  TORCH_CHECK(U_in.device().is_cpu() && U_in.scalar_type() == at::kDouble, op,
              ": U must be a float64 CPU tensor, got ", U_in.scalar_type(), " on ", U_in.device());
  TORCH_CHECK(U_in.dim() == 2 && U_in.size(1) == K, op, ": U must have shape (B, ", K,
              ") for G of shape (", K, ", ", K, "), got ", U_in.sizes());
  const Budget budget = checked_budget(iters, ridge, tol, backup, op);
  const at::Tensor U = U_in.contiguous();
  const int64_t B = U.size(0);
  at::Tensor out = at::empty({B, K}, U.options());
  const double* g = G.data_ptr<double>();
  const bool symmetric = exactly_symmetric(g, K);
  // A non-finite entry makes the torch solve spread NaN through the weights in a pattern that
  // depends on the LAPACK kernel; here every weight is NaN.
  if (budget.iters > 0 && !all_finite(g, K * K))
    return out.fill_(std::numeric_limits<double>::quiet_NaN());
  // The B problems are independent. They run on one thread unless the first one shows they are
  // costly: below ~5 us a problem, waking (and waiting for) a worker costs more than it saves; a
  // typical K = 64 UPGrad (0.26 -> 0.14 ms split on two threads) and rank-deficient Grams (6-19
  // active-set iterations a problem at K = 64) pay. Each problem's result is the same on any
  // thread.
  if (B == 0) return out;
  const double* u = U.data_ptr<double>();
  double* o = out.data_ptr<double>();
  DualConeSolver first(g, K, symmetric, budget);
  first.run(u, o);
  if (B > 16 && first.factor_work() > kSplitWork) {
    at::parallel_for(1, B, 1, [&](int64_t b0, int64_t b1) {
      DualConeSolver solver(g, K, symmetric, budget);
      for (int64_t b = b0; b < b1; ++b) solver.run(u + b * K, o + b * K);
    });
  } else {
    for (int64_t b = 1; b < B; ++b) first.run(u + b * K, o + b * K);
  }
  return out;
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// The lowest index i with v[i] <= min(v) + tol (_qp._first_least).
int64_t first_least(const double* v, int64_t K, double tol) {
  double least = kInf;
  for (int64_t i = 0; i < K; ++i) least = std::min(least, v[i]);
  int64_t i = 0;
  while (i + 1 < K && !(v[i] <= least + tol)) ++i;
  return i;
}

// argmin_{a in simplex} a^T G a by Wolfe's minimum-norm-point method, step for step as
// mmgrad.aggregators._qp.min_norm_simplex_torch (which documents it); here the loop ends when the
// torch loop would stop changing the iterate. On the support S, y_S = p / sum(p) with
// (G_SS + ridge I) p = 1; a major step (y_S > 0) moves to y and adds the outside vertex of least
// (G y)_i when that lowers the norm by more than tol, a minor step moves towards y until the
// first coordinate reaches 0 and drops it.
at::Tensor min_norm_simplex(const at::Tensor& G_in, int64_t iters, double ridge, double tol) {
  const char* op = "mmgrad_C::min_norm_simplex";
  const at::Tensor G = checked_gram(G_in, op);
  const int64_t K = G.size(0);
  const Budget budget = checked_budget(iters, ridge, tol, 0, op);
  const double* g = G.data_ptr<double>();
  if (budget.iters > 0 && !all_finite(g, K * K))
    return at::full({K}, std::numeric_limits<double>::quiet_NaN(), G.options());
  FaceSolver face(g, K, exactly_symmetric(g, K), ridge);
  std::vector<double> x(K, 0.0), y(K), p(K), Gy(K), ratio(K);
  for (int64_t i = 0; i < K; ++i) ratio[i] = g[i * K + i];
  const int64_t first = first_least(ratio.data(), K, budget.tol);
  std::vector<int64_t> support(K);
  std::vector<uint8_t> outside(K, 1);
  x[first] = 1.0;
  outside[first] = 0;
  for (int64_t it = 0; it < budget.iters; ++it) {
    const int64_t n = free_set(outside.data(), K, support.data());
    std::fill(p.begin(), p.begin() + n, 1.0);
    face.factor(support.data(), n);
    face.solve(p.data());
    double total = 0.0;
    for (int64_t r = 0; r < n; ++r) total += p[r];
    if (!(total > 0.0)) break;
    std::fill(y.begin(), y.end(), 0.0);
    bool major = true;
    for (int64_t r = 0; r < n; ++r) {
      y[support[r]] = p[r] / total;
      major = major && y[support[r]] > 0.0;
    }
    if (major) {
      for (int64_t i = 0; i < K; ++i) Gy[i] = dot(g + i * K, y.data(), K);
      const double norm = dot(y.data(), Gy.data(), K);
      double least = kInf;
      for (int64_t i = 0; i < K; ++i) {
        if (!outside[i]) Gy[i] = kInf;
        least = std::min(least, Gy[i]);
      }
      x = y;
      if (!(norm - least > budget.tol)) break;
      outside[first_least(Gy.data(), K, budget.tol)] = 0;
      continue;
    }
    double theta = kInf;
    for (int64_t i = 0; i < K; ++i) {
      ratio[i] = !outside[i] && !(y[i] > 0.0) ? x[i] / (x[i] - y[i]) : kInf;
      theta = std::min(theta, ratio[i]);
    }
    const int64_t leave = first_least(ratio.data(), K, budget.tol);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = support[r];
      x[i] += theta * (y[i] - x[i]);
      if (x[i] <= 0.0 || i == leave) {
        x[i] = 0.0;
        outside[i] = 1;
      }
    }
  }
  return normalized_on_simplex(x, G.options());
}

// argmin_{w in simplex} b^T w + s |g_w| (the CAGrad dual). On the face with free set F, with
// p = M^{-1} 1 and q = M^{-1} b_F (M = G_FF + ridge I), A2 = 1^T p, A1 = 1^T q, A0 = b_F^T q:
// w_F = p / A2 + kappa ((A1 / A2) p - q), kappa = (A2 (s^2 - (A0 - A1^2 / A2)))^{-1/2}, capped
// at kappa_max where that is not real; multipliers mu = b + G w / kappa - nu with
// nu = (1 / kappa + A1) / A2.
at::Tensor cagrad_dual(const at::Tensor& G_in, const at::Tensor& b_in, const at::Tensor& s_in,
                       int64_t iters, double ridge, double tol, int64_t backup, double kappa_max) {
  const char* op = "mmgrad_C::cagrad_dual";
  const at::Tensor G = checked_gram(G_in, op);
  const int64_t K = G.size(0);
  TORCH_CHECK(b_in.device().is_cpu() && b_in.scalar_type() == at::kDouble, op,
              ": b must be a float64 CPU tensor, got ", b_in.scalar_type(), " on ", b_in.device());
  TORCH_CHECK(b_in.dim() == 1 && b_in.size(0) == K, op, ": b must have shape (", K,
              ",) for G of shape (", K, ", ", K, "), got ", b_in.sizes());
  TORCH_CHECK(s_in.device().is_cpu() && s_in.scalar_type() == at::kDouble && s_in.numel() == 1,
              op, ": s must be a float64 CPU tensor with one element, got ", s_in.scalar_type(),
              " with ", s_in.numel(), " elements on ", s_in.device());
  const Budget budget = checked_budget(iters, ridge, tol, backup, op);
  const at::Tensor b_t = b_in.contiguous();
  const double* b = b_t.data_ptr<double>();
  const double scale = s_in.reshape({}).item<double>();
  const double* g = G.data_ptr<double>();
  FaceSolver face(g, K, exactly_symmetric(g, K), ridge);
  std::vector<double> w(K, 1.0 / static_cast<double>(K)), p(K), q(K);
  std::vector<int64_t> free(K);
  std::vector<uint8_t> tight(K, 0), infeasible(K);
  Pivoting pivoting(K, budget.backup);
  for (int64_t it = 0; it < budget.iters; ++it) {
    const int64_t n = free_set(tight.data(), K, free.data());
    for (int64_t r = 0; r < n; ++r) {
      p[r] = 1.0;
      q[r] = b[free[r]];
    }
    face.factor(free.data(), n);
    face.solve(p.data());
    face.solve(q.data());
    double A2 = 0.0, A1 = 0.0, A0 = 0.0;
    for (int64_t r = 0; r < n; ++r) {
      A2 += p[r];
      A1 += q[r];
      A0 += b[free[r]] * q[r];
    }
    if (!(A2 > 0.0)) A2 = 1.0;
    const double excess = A0 - A1 * A1 / A2;
    const double den = A2 * (scale * scale - (excess < 0.0 ? 0.0 : excess));
    const double kappa = den > 0.0 ? std::min(1.0 / std::sqrt(den), kappa_max) : kappa_max;
    std::fill(w.begin(), w.end(), 0.0);
    for (int64_t r = 0; r < n; ++r) w[free[r]] = p[r] / A2 + kappa * ((A1 / A2) * p[r] - q[r]);
    if (it + 1 == budget.iters) break;
    const double nu = (1.0 / kappa + A1) / A2;
    for (int64_t i = 0; i < K; ++i)
      infeasible[i] = tight[i] ? b[i] + dot(g + i * K, w.data(), K) / kappa - nu < -budget.tol
                               : w[i] < -budget.tol;
    if (!pivoting.exchange(infeasible.data(), tight.data(), K)) break;
  }
  return normalized_on_simplex(w, G.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("project_dual_cone", &project_dual_cone);
  m.impl("min_norm_simplex", &min_norm_simplex);
  m.impl("cagrad_dual", &cagrad_dual);
}

}  // namespace cpu
}  // namespace mmgrad
