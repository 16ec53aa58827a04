// Segment ops on a flat buffer: segment_moments (phase 1; phase 2 is reduce_tiles_kernel),
// segment_scale_ (with optional Philox noise) and segment_lerp_. One block per tile of the
// segment table (common.cuh); each thread owns groups of consecutive elements that start at a
// multiple of the group size in the buffer, so whole groups are aligned 128-bit accesses, and
// the partial groups at a tile's ends are read and written lane by lane inside the tile only.
#pragma once

#include "kernels/common.cuh"
#include "kernels/philox.cuh"

namespace mmgrad {
namespace cuda {

// part[t] = (sum, sum of squares) of tile t, accumulated in column order per thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    moments_partial_kernel(const T* x, TileTable tt, bool aligned, acc_t<T>* part) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  __shared__ A red[kWarps * 2];
  const Tile tile = locate_tile(tt, blockIdx.x);
  A m[2] = {A(0), A(0)};
  for (int64_t g = tile.lo / V + threadIdx.x; g * V < tile.hi; g += kThreads) {
    const int64_t c0 = g * V;
    const int lo = static_cast<int>(imax(tile.lo - c0, 0));
    const int hi = static_cast<int>(imin(tile.hi - c0, V));
    const Pack<T> p = load_pack(x + c0, lo, hi, aligned);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const A a = to_acc(p.v[v]);
      m[0] += a;
      m[1] = fma_acc(a, a, m[1]);
    }
  }
  const A total = block_sum<kThreads, 2>(m, red);
  if (threadIdx.x < 2) part[static_cast<int64_t>(blockIdx.x) * 2 + threadIdx.x] = total;
}

// x[seg s] = scale[s] * x[seg s] (+ noise_std[s] * philox_normal(seed, index) when NOISE).
// Groups are max(V, 4) elements: whole Philox blocks, whole 128-bit packs. The seed is read on
// the device, so a captured CUDA graph sees the seed's current value on every replay.
template <typename T, bool NOISE>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(T* x, TileTable tt, const acc_t<T>* scale, const acc_t<T>* noise_std,
                 const int64_t* seed, bool aligned) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  constexpr int G = V >= 4 ? V : 4;
  const Tile tile = locate_tile(tt, blockIdx.x);
  if (tile.lo >= tile.hi) return;
  const A sc = scale[tile.seg];
  A sd = A(0);
  uint64_t key = 0;
  if (NOISE) {
    sd = noise_std[tile.seg];
    key = static_cast<uint64_t>(*seed);
  }
  for (int64_t g = tile.lo / G + threadIdx.x; g * G < tile.hi; g += kThreads) {
    const int64_t c0 = g * G;
    float z[G];
    if (NOISE) {
#pragma unroll
      for (int b = 0; b < G / 4; ++b) {
        float z4[4];
        philox_normal4(static_cast<uint64_t>(c0 >> 2) + b, key, z4);
#pragma unroll
        for (int l = 0; l < 4; ++l) z[4 * b + l] = z4[l];
      }
    }
#pragma unroll
    for (int p = 0; p < G / V; ++p) {
      const int64_t cp = c0 + p * V;
      const int lo = static_cast<int>(imax(tile.lo - cp, 0));
      const int hi = static_cast<int>(imin(tile.hi - cp, V));
      if (hi <= lo) continue;
      const Pack<T> xv = load_pack(x + cp, lo, hi, aligned);
      A r[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        r[v] = mul_rn(sc, to_acc(xv.v[v]));
        if (NOISE) r[v] = add_rn(r[v], mul_rn(sd, static_cast<A>(z[p * V + v])));
      }
      store_pack(x + cp, r, lo, hi, aligned);
    }
  }
}

// x[seg s] = weight[s] * y[seg s] + (1 - weight[s]) * x[seg s], 1 - weight[s] rounded in the
// accumulation type as the reference does.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lerp_kernel(T* x, const T* y, TileTable tt, const acc_t<T>* weight, bool aligned) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  const Tile tile = locate_tile(tt, blockIdx.x);
  if (tile.lo >= tile.hi) return;
  const A w = weight[tile.seg];
  const A omw = sub_rn(A(1), w);
  for (int64_t g = tile.lo / V + threadIdx.x; g * V < tile.hi; g += kThreads) {
    const int64_t c0 = g * V;
    const int lo = static_cast<int>(imax(tile.lo - c0, 0));
    const int hi = static_cast<int>(imin(tile.hi - c0, V));
    const Pack<T> xv = load_pack(x + c0, lo, hi, aligned);
    const Pack<T> yv = load_pack(y + c0, lo, hi, aligned);
    A r[V];
#pragma unroll
    for (int v = 0; v < V; ++v)
      r[v] = add_rn(mul_rn(w, to_acc(yv.v[v])), mul_rn(omw, to_acc(xv.v[v])));
    store_pack(x + c0, r, lo, hi, aligned);
  }
}

}  // namespace cuda
}  // namespace mmgrad
