// CPU segment_gram and segment_combine_: per-segment K x K Gram matrices of the column segments
// of J, and the per-segment combination out[seg s] = weights[s] @ J[:, seg s].
//
// Work items are chunks of at most kChunk columns of one segment, listed on the host in segment
// order, so partial Grams are summed per segment in a fixed order whatever the thread count
// (bitwise reproducible). K is small for these ops (2 for MMPareto); the inner loops run over
// columns with fixed-width lane accumulators that GCC vectorises without -ffast-math.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "cpu/kernels.h"
#include "cpu/matrix_common.h"
#include "segment_table.h"

namespace mmgrad {
namespace cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 14;  // columns per work item
constexpr int64_t kBlock = 256;               // columns converted to the accumulation type at once
constexpr int kLanes = 16;

struct ColumnChunk {
  int64_t seg, start, len;
};

// Validates (offsets, numels) against P columns (and that no two segments overlap: the contract
// of every backend; an op that writes them would depend on thread timing) and lists the work
// items in segment order.
std::vector<ColumnChunk> column_chunks(const at::Tensor& offsets, const at::Tensor& numels, int64_t P,
                                       const char* op) {
  check_segment_table(offsets, numels, at::Device(at::kCPU), op);
  auto o = offsets.contiguous(), n = numels.contiguous();
  const int64_t* op_ = o.data_ptr<int64_t>();
  const int64_t* np_ = n.data_ptr<int64_t>();
  const int64_t S = o.numel();
  std::vector<ColumnChunk> chunks;
  for (int64_t s = 0; s < S; ++s) {
    // (numel <= P - offset, not offset + numel <= P: the sum can overflow)
    TORCH_CHECK(np_[s] >= 0 && op_[s] >= 0 && op_[s] <= P && np_[s] <= P - op_[s], op, ": segment ", s,
                " (offset ", op_[s], ", numel ", np_[s], ") lies outside the ", P, " columns");
    for (int64_t c = 0; c < np_[s]; c += kChunk) chunks.push_back({s, op_[s] + c, std::min(kChunk, np_[s] - c)});
  }
  check_disjoint_segments(op_, np_, S, op);
  return chunks;
}

void check_matrix(const at::Tensor& J, const char* op) {
  TORCH_CHECK(J.device().is_cpu(), op, ": J must be a CPU tensor");
  TORCH_CHECK(J.dim() == 2, op, ": J must be 2-D (K, P), got shape ", J.sizes());
  TORCH_CHECK(J.size(1) <= 1 || J.stride(1) == 1, op, ": J's columns must be contiguous (stride(1) == 1)");
  dtype_index(J, op, "J");
}

template <typename T, typename A>
void gram_chunk(const T* J, int64_t K, int64_t ld, int64_t c0, int64_t len, A* out /* K*K */) {
  std::vector<A> tile(K * kBlock);
  std::vector<A> acc(K * K * kLanes, A(0));
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t w = std::min(kBlock, len - b);
    for (int64_t k = 0; k < K; ++k) {
      const T* row = J + k * ld + c0 + b;
      A* t = tile.data() + k * kBlock;
      for (int64_t c = 0; c < w; ++c) t[c] = static_cast<A>(row[c]);
      for (int64_t c = w; c < kBlock; ++c) t[c] = A(0);
    }
    for (int64_t i = 0; i < K; ++i) {
      const A* ti = tile.data() + i * kBlock;
      for (int64_t j = i; j < K; ++j) {
        const A* tj = tile.data() + j * kBlock;
        A* a = acc.data() + (i * K + j) * kLanes;
        for (int64_t c = 0; c < kBlock; c += kLanes)
          for (int l = 0; l < kLanes; ++l) a[l] += ti[c + l] * tj[c + l];
      }
    }
  }
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = i; j < K; ++j) {
      A s = 0;
      const A* a = acc.data() + (i * K + j) * kLanes;
      for (int l = 0; l < kLanes; ++l) s += a[l];
      out[i * K + j] = s;
      out[j * K + i] = s;
    }
}

template <typename T, typename A>
void combine_chunk(const T* J, int64_t K, int64_t ld, const A* w, T* out, int64_t c0, int64_t len) {
  A buf[kBlock];
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t n = std::min(kBlock, len - b);
    for (int64_t c = 0; c < n; ++c) buf[c] = A(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* row = J + k * ld + c0 + b;
      const A wk = w[k];
      for (int64_t c = 0; c < n; ++c) buf[c] += wk * static_cast<A>(row[c]);
    }
    // Every column of J in this block was read above: `out` may be a row of J.
    T* o = out + c0 + b;
    for (int64_t c = 0; c < n; ++c) o[c] = static_cast<T>(buf[c]);
  }
}

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

at::Tensor segment_gram_cpu(const at::Tensor& J, const at::Tensor& offsets, const at::Tensor& numels) {
  const char* op = "mmgrad_C::segment_gram";
  check_matrix(J, op);
  const int64_t K = J.size(0), P = J.size(1), S = offsets.numel();
  auto chunks = column_chunks(offsets, numels, P, op);
  auto acc_type = accumulation_dtype(J.scalar_type());
  at::Tensor out = at::zeros({S, K, K}, J.options().dtype(acc_type));
  if (K == 0 || chunks.empty()) return out;
  const int64_t ld = J.stride(0);
  at::Tensor partial = at::empty({(int64_t)chunks.size(), K, K}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, J.scalar_type(), "segment_gram", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* data = J.data_ptr<scalar_t>();
    A* part = partial.data_ptr<A>();
    at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        gram_chunk<scalar_t, A>(data, K, ld, chunks[i].start, chunks[i].len, part + i * K * K);
    });
    A* o = out.data_ptr<A>();
    for (size_t i = 0; i < chunks.size(); ++i) {  // fixed order: chunks are in segment order
      A* dst = o + chunks[i].seg * K * K;
      for (int64_t e = 0; e < K * K; ++e) dst[e] += part[i * K * K + e];
    }
  });
  return out;
}

void segment_combine_cpu(const at::Tensor& out, const at::Tensor& J, const at::Tensor& offsets,
                         const at::Tensor& numels, const at::Tensor& weights) {
  const char* op = "mmgrad_C::segment_combine_";
  check_matrix(J, op);
  const int64_t K = J.size(0), P = J.size(1), S = offsets.numel();
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 1 && out.is_contiguous() && out.size(0) == P, op,
              ": out must be a contiguous CPU buffer of P = ", P, " elements");
  TORCH_CHECK(out.scalar_type() == J.scalar_type(), op, ": out must have J's dtype ", J.scalar_type());
  auto acc_type = accumulation_dtype(J.scalar_type());
  TORCH_CHECK(weights.device().is_cpu() && weights.dim() == 2 && weights.size(0) == S && weights.size(1) == K,
              op, ": weights must be a (S, K) = (", S, ", ", K, ") CPU tensor, got ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == acc_type, op, ": weights must be ", acc_type);
  auto chunks = column_chunks(offsets, numels, P, op);
  if (chunks.empty()) return;
  auto w = weights.contiguous();
  const int64_t ld = J.stride(0);
  const int di = dtype_index(J, op, "J");
  const CombineKernels& ck = combine_kernels();
  const int64_t tile = 2048;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, J.scalar_type(), "segment_combine_", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* data = J.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const A* wp = w.data_ptr<A>();
    at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t lo, int64_t hi) {
      // The combine kernel (all K rows per output vector, streaming stores) from the first
      // 64-byte-aligned output column of each chunk; the columns before it with the plain loop.
      Scratch tilebuf(tile * sizeof(A) + K * ck.vector_bytes), rows(K * sizeof(void*));
      CombineArgs a;
      a.J = data;
      a.K = K;
      a.ld = ld;
      a.out = o;
      a.tile = tile;
      a.tilebuf = tilebuf.p;
      a.rows = static_cast<const void**>(rows.p);
      for (int64_t i = lo; i < hi; ++i) {
        const ColumnChunk& c = chunks[i];
        const A* wc = wp + c.seg * K;
        const uintptr_t addr = reinterpret_cast<uintptr_t>(o + c.start);
        // K == 0 (zeros) and element-misaligned outputs take the plain loop throughout.
        int64_t head = K == 0 || addr % sizeof(scalar_t) ? c.len : ((64 - addr % 64) % 64) / sizeof(scalar_t);
        head = std::min(head, c.len);
        if (head > 0) combine_chunk<scalar_t, A>(data, K, ld, wc, o, c.start, head);
        if (head < c.len) {
          a.w = wc;
          a.c0 = c.start + head;
          a.c1 = c.start + c.len;
          ck.combine[di](a);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("segment_gram", &segment_gram_cpu);
  m.impl("segment_combine_", &segment_combine_cpu);
}

}  // namespace cpu
}  // namespace mmgrad
