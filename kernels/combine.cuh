// combine (out = w^T J) and segment_combine_ (out[seg s] = weights[s] @ J[:, seg s]).
//
// Each thread owns a group of V = 16 / sizeof(T) consecutive columns and sums its K terms in row
// order, one fused multiply-add per term in the accumulation type (as the CPU kernels do), so the
// result does not depend on the launch shape. Rows are read four at a time to keep several loads
// in flight. All K rows of a group are read before the group is written: `out` may be a row of J
// (segment_combine_), and no other thread touches those columns.
#pragma once

#include "kernels/common.cuh"

namespace mmgrad {
namespace cuda {

// acc[v] = sum_k w[k] * J[k, c0 + v] for lanes v in [lo, hi) (other lanes 0).
template <typename T>
__device__ __forceinline__ void combine_group(const T* J, int64_t ld, int64_t K, const acc_t<T>* w,
                                              int64_t c0, int lo, int hi, bool aligned,
                                              acc_t<T> (&acc)[vec_width<T>()]) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  constexpr int U = 4;
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = A(0);
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    Pack<T> x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) x[u] = load_pack(J + (k + u) * ld + c0, lo, hi, aligned);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const A wk = w[k + u];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = fma_acc(wk, to_acc(x[u].v[v]), acc[v]);
    }
  }
  for (; k < K; ++k) {
    const Pack<T> x = load_pack(J + k * ld + c0, lo, hi, aligned);
    const A wk = w[k];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = fma_acc(wk, to_acc(x.v[v]), acc[v]);
  }
}

// out (P,) = w (K,) @ J (K, P). One group of V columns per thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const T* J, int64_t ld, int64_t K, const acc_t<T>* w, T* out, int64_t P,
                   bool aligned_in, bool aligned_out) {
  constexpr int V = vec_width<T>();
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  if (c0 >= P) return;
  const int hi = static_cast<int>(imin(P - c0, V));
  acc_t<T> acc[V];
  combine_group(J, ld, K, w, c0, 0, hi, aligned_in, acc);
  store_pack(out + c0, acc, 0, hi, aligned_out);
}

// One block per tile of the column segment table; weights is (S, K), row s for segment s.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    segment_combine_kernel(T* out, const T* J, int64_t ld, int64_t K, const acc_t<T>* weights,
                           TileTable tt, bool aligned_in, bool aligned_out) {
  constexpr int V = vec_width<T>();
  const Tile tile = locate_tile(tt, blockIdx.x);
  const acc_t<T>* w = weights + tile.seg * K;
  for (int64_t g = tile.lo / V + threadIdx.x; g * V < tile.hi; g += kThreads) {
    const int64_t c0 = g * V;
    const int lo = static_cast<int>(imax(tile.lo - c0, 0));
    const int hi = static_cast<int>(imin(tile.hi - c0, V));
    acc_t<T> acc[V];
    combine_group(J, ld, K, w, c0, lo, hi, aligned_in, acc);
    store_pack(out + c0, acc, lo, hi, aligned_out);
  }
}

}  // namespace cuda
}  // namespace mmgrad
