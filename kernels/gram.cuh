// Phase 1 of gram (J J^T) and segment_gram: per-tile partial Gram matrices of the rows of
// J (K, P), row stride ld, unit column stride. Phase 2 is reduce_tiles_kernel (common.cuh).
//
// Rows are split into blocks of RB; block (t, q) handles tile t (a column range) and the
// row-block pair q = (bi, bj), bi <= bj, of the upper triangle. Each thread owns whole column
// groups of V = 16 / sizeof(T) columns (one 128-bit load per row when aligned), accumulates all
// RB x RB products of its columns in registers (fused multiply-adds in the accumulation type, in
// column order) and the block sums them in a fixed order at the end of the tile. The tile's
// upper-triangle entries go to part[t * K (K + 1) / 2 + tri(i, j)].
#pragma once

#include "kernels/common.cuh"

namespace mmgrad {
namespace cuda {

// Index of (i, j), i <= j, in the row-major upper triangle of a K x K matrix.
__device__ __forceinline__ int64_t tri_index(int64_t i, int64_t j, int64_t K) {
  return i * K - i * (i - 1) / 2 + (j - i);
}

// pairs_on_x: the pair index is blockIdx.x and the tile blockIdx.y (dense gram: the pairs of a
// tile run next to each other, so a row block read by two pairs comes from L2); otherwise the
// tile is blockIdx.x (segment_gram: many tiles, grid.y is limited to 65535).
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads)
    gram_partial_kernel(const T* J, int64_t ld, int64_t K, int64_t NB, TileTable tt,
                        bool aligned, bool pairs_on_x, acc_t<T>* part) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  __shared__ A red[kWarps * RB * RB];
  const int64_t t = pairs_on_x ? blockIdx.y : blockIdx.x;
  int64_t q = pairs_on_x ? blockIdx.x : blockIdx.y;
  int64_t bi = 0;
  while (q >= NB - bi) {
    q -= NB - bi;
    ++bi;
  }
  const int64_t bj = bi + q;
  const bool diag = bi == bj;
  const int64_t i0 = bi * RB, j0 = bj * RB;
  const int64_t na = imin(RB, K - i0), nb = imin(RB, K - j0);

  const Tile tile = locate_tile(tt, t);
  A acc[RB * RB];
#pragma unroll
  for (int e = 0; e < RB * RB; ++e) acc[e] = A(0);

  for (int64_t g = tile.lo / V + threadIdx.x; g * V < tile.hi; g += kThreads) {
    const int64_t c0 = g * V;
    const int lo = static_cast<int>(imax(tile.lo - c0, 0));
    const int hi = static_cast<int>(imin(tile.hi - c0, V));
    Pack<T> xa[RB], xb[RB];
#pragma unroll
    for (int a = 0; a < RB; ++a) {
      if (a < na) {
        xa[a] = load_pack(J + (i0 + a) * ld + c0, lo, hi, aligned);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) xa[a].v[v] = Store<T>::from(A(0));
      }
    }
    if (!diag) {
#pragma unroll
      for (int b = 0; b < RB; ++b) {
        if (b < nb) {
          xb[b] = load_pack(J + (j0 + b) * ld + c0, lo, hi, aligned);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) xb[b].v[v] = Store<T>::from(A(0));
        }
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
#pragma unroll
      for (int a = 0; a < RB; ++a) {
        const A fa = to_acc(xa[a].v[v]);
#pragma unroll
        for (int b = 0; b < RB; ++b) {
          const A fb = to_acc(diag ? xa[b].v[v] : xb[b].v[v]);
          acc[a * RB + b] = fma_acc(fa, fb, acc[a * RB + b]);
        }
      }
    }
  }

  const A total = block_sum<kThreads, RB * RB>(acc, red);
  if (threadIdx.x < RB * RB) {
    const int64_t i = i0 + threadIdx.x / RB, j = j0 + threadIdx.x % RB;
    if (i <= j && j < K) part[t * (K * (K + 1) / 2) + tri_index(i, j, K)] = total;
  }
}

}  // namespace cuda
}  // namespace mmgrad
