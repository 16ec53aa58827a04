// CPU combine (w @ J): every output element sums its K terms in row order (FMA chain in the
// accumulation dtype), so any split of the columns over threads gives the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/matrix_common.h"

#define MMG_KERNEL_FILE "cpu/combine_kernels.inc"
#include "cpu/for_each_isa.h"

namespace mmgrad {
namespace cpu {

const CombineKernels& combine_kernels() {
  switch (cpu_isa()) {
#if MMG_X86
    case Isa::Avx512:
      return avx512::kCombineKernels;
    case Isa::Avx2:
      return avx2::kCombineKernels;
#endif
    default:
      return generic::kCombineKernels;
  }
}

namespace {

at::Tensor combine(const at::Tensor& J, const at::Tensor& w) {
  const char* op = "mmgrad_C::combine";
  const int di = check_J(J, op);
  const int64_t K = J.size(0), P = J.size(1);
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), op, ": w must be a CPU tensor, got device ", w.device());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == K, op, ": w must have shape (K,) = (", K,
              ",) to match J, got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == acc, op, ": w must be ", acc,
              " (the accumulation dtype of J), got ", w.scalar_type());
  const at::Tensor wc = w.contiguous();
  if (K == 0) return at::zeros({P}, J.options());
  at::Tensor out = at::empty({P}, J.options());
  if (P == 0) return out;
  const CombineKernels& gk = combine_kernels();
  const int64_t elt = acc == at::kDouble ? 8 : 4;
  const int64_t tile = 2048, block = int64_t(1) << 16;
  const int64_t nblocks = (P + block - 1) / block;
  const auto kern = gk.combine[di];
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
    for (int64_t blk = b; blk < e; ++blk) {
      a.c0 = blk * block;
      a.c1 = std::min(P, a.c0 + block);
      kern(a);
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("combine", &mmgrad::cpu::combine);
}
