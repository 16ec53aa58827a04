// Shared device code of mmgrad's CUDA kernels: storage and accumulation types, 128-bit packs with
// masked scalar fallbacks, fixed-order block reductions, and the tile map of a segment table.
//
// Torch-free: the launchers in csrc/cuda/ pass raw pointers. Storage types are float, double,
// __half and __nv_bfloat16; float64 data accumulates in double, everything else in float
// (mmgrad.reference.accumulation_dtype).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mmgrad {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of the streaming kernels
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// Elements per 128-bit access.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

// Conversions between storage and accumulation types; to storage rounds to nearest even.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Store<double> {
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Correctly rounded arithmetic that the compiler may not contract into an FMA: the elementwise
// ops round every product and sum as the reference's separate torch ops do.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
// Accumulation steps (reductions) use explicit fused multiply-adds.
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// The group of V = vec_width<T>() elements starting at p (p is at a multiple of V in its buffer);
// lanes [lo, hi) are read, the others are zero. Only a whole group at an aligned address becomes
// one 128-bit load; lanes outside [lo, hi) are never touched (they may belong to another tile
// that is being written).
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p, int lo, int hi, bool aligned) {
  constexpr int V = vec_width<T>();
  Pack<T> r;
  if (aligned && lo == 0 && hi == V) {
    r = *reinterpret_cast<const Pack<T>*>(p);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) r.v[v] = (v >= lo && v < hi) ? p[v] : Store<T>::from(acc_t<T>(0));
  }
  return r;
}

// Stores lanes [lo, hi) of a group (see load_pack), converting from the accumulation type.
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const acc_t<T> (&a)[vec_width<T>()], int lo, int hi,
                                           bool aligned) {
  constexpr int V = vec_width<T>();
  if (aligned && lo == 0 && hi == V) {
    Pack<T> r;
#pragma unroll
    for (int v = 0; v < V; ++v) r.v[v] = Store<T>::from(a[v]);
    *reinterpret_cast<Pack<T>*>(p) = r;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (v >= lo && v < hi) p[v] = Store<T>::from(a[v]);
  }
}

// Block-wide sums of N values per thread (blockDim.x == NT). Fixed order: a shuffle tree inside
// each warp, then the warps' results in warp order. Thread e < N returns the total of entry e;
// other threads return 0. `red` is shared memory of (NT / 32) * N elements.
template <int NT, int N, typename A>
__device__ __forceinline__ A block_sum(A (&v)[N], A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int e = 0; e < N; ++e) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[e] += __shfl_down_sync(kFullMask, v[e], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int e = 0; e < N; ++e) red[warp * N + e] = v[e];
  }
  __syncthreads();
  A total = A(0);
  if (threadIdx.x < N) {
    total = red[threadIdx.x];
    for (int w = 1; w < NT / 32; ++w) total += red[w * N + threadIdx.x];
  }
  return total;
}

// ---- tile map --------------------------------------------------------------------------------
// Work is cut into tiles of at most `tile` consecutive elements (or columns) of one segment; one
// block handles one tile. The cut depends only on the segment table, so every reduction has the
// same partition, hence the same rounding, run after run. Without a table (tile_end == nullptr)
// the range [0, n) is one segment.
//
// The table stays on the device (reading it on the host would synchronise), so it cannot be
// validated there: a segment is clipped to [0, n) and a negative length counts as 0, which keeps
// every access in bounds. The launch has cdiv(n, tile) + S blocks, enough for any table of
// disjoint segments (the contract of mmgrad.reference).

struct TileTable {
  const int64_t* tile_end;  // inclusive running count of tiles per segment (S entries)
  const int64_t* offsets;
  const int64_t* numels;
  int64_t S;
  int64_t n;     // length of the indexed range (flat buffer or columns of J)
  int64_t tile;  // elements per tile
};

struct Tile {
  int64_t seg, lo, hi;  // elements [lo, hi) of segment seg; lo == hi when there is nothing to do
};

// Length of segment s after clipping to [0, n).
__device__ __forceinline__ int64_t segment_length(const TileTable& tt, int64_t s) {
  const int64_t off = tt.offsets[s], num = tt.numels[s];
  if (off < 0 || num <= 0 || off >= tt.n) return 0;
  return imin(num, tt.n - off);
}

__device__ __forceinline__ Tile locate_tile(const TileTable& tt, int64_t t) {
  if (tt.tile_end == nullptr) {
    const int64_t lo = imin(t * tt.tile, tt.n);
    return {0, lo, imin(lo + tt.tile, tt.n)};
  }
  // First segment whose running tile count exceeds t (every thread of the block reads the same
  // entries: broadcast loads).
  int64_t a = 0, b = tt.S;
  while (a < b) {
    const int64_t mid = (a + b) >> 1;
    if (tt.tile_end[mid] > t)
      b = mid;
    else
      a = mid + 1;
  }
  if (a >= tt.S) return {0, 0, 0};
  const int64_t len = segment_length(tt, a);
  const int64_t first = tt.tile_end[a] - ceil_div(len, tt.tile);
  const int64_t begin = (t - first) * tt.tile;
  const int64_t off = tt.offsets[a];
  return {a, off + begin, off + imin(len, begin + tt.tile)};
}

// tile_end[s] = sum over s' <= s of cdiv(length(s'), tile). One block of 1024 threads. (static:
// each translation unit that launches it has its own copy.)
static __global__ void __launch_bounds__(1024) tile_scan_kernel(TileTable tt, int64_t* tile_end) {
  __shared__ int64_t warp_total[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t carry = 0;
  for (int64_t base = 0; base < tt.S; base += 1024) {
    const int64_t s = base + threadIdx.x;
    int64_t v = s < tt.S ? ceil_div(segment_length(tt, s), tt.tile) : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int64_t up = __shfl_up_sync(kFullMask, v, off);
      if (lane >= off) v += up;
    }
    if (lane == 31) warp_total[warp] = v;
    __syncthreads();
    if (warp == 0) {
      int64_t w = warp_total[lane];
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int64_t up = __shfl_up_sync(kFullMask, w, off);
        if (lane >= off) w += up;
      }
      warp_total[lane] = w;
    }
    __syncthreads();
    if (warp > 0) v += warp_total[warp - 1];
    if (s < tt.S) tile_end[s] = carry + v;
    carry += warp_total[31];
    __syncthreads();  // warp_total is rewritten by the next round
  }
}

// Phase 2 of the two-phase reductions: out entry e of segment s is the sum, in tile order, of
// part[t * E + e] over the tiles t of segment s (tiles past ntiles were never launched). One block
// of NT threads per (s, e), blockIdx.x = s * E + e. SYM: E = K (K + 1) / 2 upper-triangle entries
// of a symmetric K x K matrix, written to both (i, j) and (j, i) so that out is exactly symmetric.
template <typename A, bool SYM, int NT>
__global__ void __launch_bounds__(NT)
    reduce_tiles_kernel(const A* part, int64_t ntiles, TileTable tt, int64_t E, int64_t K, A* out) {
  __shared__ A red[NT / 32];
  const int64_t b = blockIdx.x;
  const int64_t s = b / E, e = b % E;
  int64_t first = 0, nt = ntiles;
  if (tt.tile_end != nullptr) {
    nt = ceil_div(segment_length(tt, s), tt.tile);
    first = tt.tile_end[s] - nt;
  }
  const int64_t end = imin(first + nt, ntiles);
  A v[1] = {A(0)};
  for (int64_t t = first + threadIdx.x; t < end; t += NT) v[0] += part[t * E + e];
  const A total = block_sum<NT, 1>(v, red);
  if (threadIdx.x != 0) return;
  if (SYM) {
    int64_t i = 0, r = e;
    while (r >= K - i) {
      r -= K - i;
      ++i;
    }
    const int64_t j = i + r;
    out[s * K * K + i * K + j] = total;
    out[s * K * K + j * K + i] = total;
  } else {
    out[s * E + e] = total;
  }
}

}  // namespace cuda
}  // namespace mmgrad
