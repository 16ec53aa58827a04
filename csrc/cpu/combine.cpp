// CPU combine (w @ J): every output element sums its K terms in row order (FMA chain in the
// accumulation dtype), so any split of the columns over threads gives the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/matrix_common.h"
#include "cpu/output_pool.h"

#define MMG_KERNEL_FILE "cpu/combine_kernels.inc"
#include "cpu/for_each_isa.h"

namespace mmgrad {
namespace cpu {

const CombineKernels& combine_kernels() { return MMG_ISA_TABLE(kCombineKernels); }

namespace {

// Outputs at least this large are written with streaming stores: they would only evict J (still
// to be read) from the cache. Smaller ones stay cached for whoever reads them next.
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;

// out = w @ J; out is a contiguous (P,) tensor of J's dtype (validated by the callers).
void combine_into(const at::Tensor& J, const at::Tensor& w, const at::Tensor& out, int di) {
  const int64_t K = J.size(0), P = J.size(1);
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  if (P == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const at::Tensor wc = w.contiguous();
  const CombineKernels& gk = combine_kernels();
  const int64_t elt = acc == at::kDouble ? 8 : 4;
  const int64_t tile = 2048, block = int64_t(1) << 16;
  const int64_t nblocks = (P + block - 1) / block;
  const auto kern = gk.combine[di];
  const bool stream = P * J.element_size() >= kStreamMinBytes &&
                      reinterpret_cast<uintptr_t>(out.data_ptr()) % 64 == 0;
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    Scratch tilebuf(tile * elt + K * gk.vector_bytes), rows(K * sizeof(void*));
    CombineArgs a;
    a.J = J.data_ptr();
    a.K = K;
    a.ld = J.stride(0);
    a.w = wc.data_ptr();
    a.out = out.data_ptr();
    a.tile = tile;
    a.tilebuf = tilebuf.p;
    a.rows = static_cast<const void**>(rows.p);
    a.stream = stream;
    for (int64_t blk = b; blk < e; ++blk) {
      a.c0 = blk * block;
      a.c1 = std::min(P, a.c0 + block);
      kern(a);
    }
  });
}

int check_combine(const at::Tensor& J, const at::Tensor& w, const char* op) {
  const int di = check_J(J, op);
  const int64_t K = J.size(0);
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), op, ": w must be a CPU tensor, got device ", w.device());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == K, op, ": w must have shape (K,) = (", K,
              ",) to match J, got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == acc, op, ": w must be ", acc,
              " (the accumulation dtype of J), got ", w.scalar_type());
  return di;
}

at::Tensor combine(const at::Tensor& J, const at::Tensor& w) {
  const int di = check_combine(J, w, "mmgrad_C::combine");
  at::Tensor out = pooled_empty({J.size(1)}, J.options());
  combine_into(J, w, out, di);
  return out;
}

// Into an existing buffer: no fresh allocation, whose page faults cost more than the arithmetic
// at small K. Every output column is written after its K inputs are read, so out may be a row of
// J (the caller routes any other overlap through a copy).
void combine_out(const at::Tensor& J, const at::Tensor& w, const at::Tensor& out) {
  const char* op = "mmgrad_C::combine_out";
  const int di = check_combine(J, w, op);
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 1 && out.is_contiguous() && out.size(0) == J.size(1),
              op, ": out must be a contiguous CPU tensor of P = ", J.size(1), " elements, got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == J.scalar_type(), op, ": out must have J's dtype ", J.scalar_type(),
              ", got ", out.scalar_type());
  combine_into(J, w, out, di);
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("combine", &mmgrad::cpu::combine);
  m.impl("combine_out", &mmgrad::cpu::combine_out);
}
