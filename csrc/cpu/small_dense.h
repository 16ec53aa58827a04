// Small dense float64 linear algebra shared by the K x K solvers (qp.cpp, nash.cpp,
// projection.cpp). Row-major n x n matrices; plain loops, the sizes are at most a few hundred.
#pragma once

#include <cmath>
#include <cstdint>

namespace mmgrad {
namespace cpu {

// Four independent partial sums: the dependent add chain of a plain loop would bound it by the
// add latency, not the multiply-add throughput.
inline double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += a[k] * b[k];
    s1 += a[k + 1] * b[k + 1];
    s2 += a[k + 2] * b[k + 2];
    s3 += a[k + 3] * b[k + 3];
  }
  for (; k < n; ++k) s0 += a[k] * b[k];
  return (s0 + s1) + (s2 + s3);
}

// Factors the symmetric matrix a (upper triangle read) in place into R with R^T R = a, upper
// triangle. Row k of R is a's row k minus sum_{i<k} R[i][k] R[i][k..n), taken in order of i (the
// rounding of the textbook right-looking update), eight columns at a time in registers: the
// right-looking form loads and stores every trailing element once per step, which bounded it at
// the sizes the solvers factor (n ~ 30: 1.4 -> 1.0 us). False at a pivot that is not positive (or
// NaN): the matrix is not numerically positive definite.
inline bool cholesky_upper(double* a, int64_t n) {
  constexpr int64_t W = 8;
  for (int64_t k = 0; k < n; ++k) {
    double* rk = a + k * n;
    int64_t c = k;
    for (; c + W <= n; c += W) {
      double acc[W];
      for (int64_t j = 0; j < W; ++j) acc[j] = rk[c + j];
      for (int64_t i = 0; i < k; ++i) {
        const double* ri = a + i * n;
        const double l = ri[k];
        for (int64_t j = 0; j < W; ++j) acc[j] -= l * ri[c + j];
      }
      for (int64_t j = 0; j < W; ++j) rk[c + j] = acc[j];
    }
    for (; c < n; ++c) {
      double acc = rk[c];
      for (int64_t i = 0; i < k; ++i) acc -= a[i * n + k] * a[i * n + c];
      rk[c] = acc;
    }
    if (!(rk[k] > 0.0)) return false;
    const double d = std::sqrt(rk[k]);
    const double inv = 1.0 / d;  // one division per row, as LAPACK's potf2
    rk[k] = d;
    for (int64_t c2 = k + 1; c2 < n; ++c2) rk[c2] *= inv;
  }
  return true;
}

// x <- (R^T R)^{-1} x for the factor R of cholesky_upper. Multiplies by reciprocals of the
// diagonal: they do not depend on x, so they leave the substitutions' dependency chains.
inline void cholesky_solve(const double* r, double* x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {  // R^T y = x, column by column
    const double* rk = r + k * n;
    const double xk = x[k] * (1.0 / rk[k]);
    x[k] = xk;
    for (int64_t c = k + 1; c < n; ++c) x[c] -= xk * rk[c];
  }
  for (int64_t k = n - 1; k >= 0; --k) {  // R x = y, row by row from the bottom
    const double* rk = r + k * n;
    x[k] = (x[k] - dot(rk + k + 1, x + k + 1, n - k - 1)) * (1.0 / rk[k]);
  }
}

}  // namespace cpu
}  // namespace mmgrad
