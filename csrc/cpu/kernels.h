// Per-ISA kernel tables and the helpers the host code of the CPU ops shares.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "segment_table.h"  // accumulation_dtype

namespace mmgrad {
namespace cpu {

// Storage dtypes of the data tensors, as the index into the kernel tables.
enum DtypeIndex { kHalf = 0, kBF16 = 1, kFloat = 2, kDouble = 3 };

// Index of a supported data dtype; fails with a message naming the op and the argument.
int dtype_index(const at::Tensor& t, const char* op, const char* arg);
// The 64 bits of a one-element int64 CPU tensor (a Philox seed or counter); fails with a message
// naming the op and the argument.
uint64_t philox_word(const at::Tensor& t, const char* op, const char* arg);

// Scalars cross the table as double (exact for float), vectors as raw pointers.
struct SegmentKernels {
  void (*moments[4])(const void* x, int64_t n, double* out);
  void (*scale[4])(void* x, int64_t n, double sc);
  void (*scale_noise[4])(void* x, int64_t n, int64_t first, double sc, double sd, uint64_t key,
                         float* nbuf);
  void (*lerp[4])(void* x, const void* y, int64_t n, double w, double omw);
  int64_t noise_buf;  // floats of scratch scale_noise needs
};
const SegmentKernels& segment_kernels();

struct GramArgs {
  const void* J;
  int64_t K, ld;      // rows, row stride in elements
  int64_t c0, c1;     // column range of this work block
  int64_t P;          // columns of J (prefetching stops there)
  int64_t tile;       // columns per cache tile (multiple of 4 vectors)
  int64_t pf_dist;    // software prefetch distance in columns (>= tile)
  int64_t flush;      // columns between spills of the vector accumulators to `slot`
  const int32_t* pb;  // pair blocks (i0, j0, ra, rb), upper triangle, diagonal when i0 == j0
  int64_t npb;
  void* tilebuf;      // K * tile accumulation-type elements (converted or padded tiles)
  void* accm;         // vector accumulators: sum over pair blocks of ra * rb vectors
  void* dacc;         // the same count of vectors of double lanes (8 bytes per lane)
  const void** rows;  // K row pointers (scratch)
  double* slot;       // K (K + 1) / 2 upper-triangle partials of this block (overwritten)
};
struct CombineArgs {
  const void* J;
  int64_t K, ld;
  const void* w;  // K weights in the accumulation type
  void* out;      // P outputs in J's dtype
  int64_t c0, c1;
  int64_t tile;
  void* tilebuf;  // tile accumulation-type elements, then K zero-padded tail rows of one vector
  const void** rows;  // K row pointers (scratch)
  bool stream = false;  // streaming (cache-bypassing) stores to out, which must be 64-byte aligned
};
struct GramKernels {
  void (*gram[4])(const GramArgs& a);
  int vector_bytes;  // VB of this ISA
  int row_block;     // rows per register block of the gram micro-kernel
};
const GramKernels& gram_kernels();

struct CombineKernels {
  void (*combine[4])(const CombineArgs& a);
  int vector_bytes;
};
const CombineKernels& combine_kernels();

}  // namespace cpu
}  // namespace mmgrad
