// CPU gram (J J^T) and combine (w @ J).
//
// gram: columns are split into work blocks whose size depends only on (K, P), never on the thread
// count; each block writes its upper-triangle partial (double) into its own slot and the slots
// are summed in block order, so the result is bitwise reproducible for any thread count. Inside
// a block, a cache-resident tile of columns is swept once per 4x4 (AVX-512) or 3x3 block of row
// pairs with register accumulators (see gram_kernels.inc).
// combine: every output element sums its K terms in row order, so any split is deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

#define MMG_KERNEL_FILE "cpu/gram_kernels.inc"
#include "cpu/for_each_isa.h"

namespace mmgrad {
namespace cpu {

const GramKernels& gram_kernels() {
  switch (cpu_isa()) {
#if MMG_X86
    case Isa::Avx512:
      return avx512::kGramKernels;
    case Isa::Avx2:
      return avx2::kGramKernels;
#endif
    default:
      return generic::kGramKernels;
  }
}

namespace {

constexpr int64_t kFlushCols = int64_t(1) << 16;  // fp32 lanes sum at most 64K columns / W
constexpr int64_t kMaxBlocks = 1024;               // bounds the slot memory for huge P
constexpr int64_t kTileBytes = int64_t(1) << 17;   // large-K tile of K rows, in L2

// 64-byte aligned scratch.
struct Scratch {
  void* p = nullptr;
  explicit Scratch(size_t bytes) {
    p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
    TORCH_CHECK(p != nullptr, "mmgrad: out of memory allocating ", bytes, " bytes of scratch");
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Asks for transparent huge pages on a large fresh output before its first touch: with 4 KiB
// pages the page faults cost more than the whole op at small K (40 ms vs 8 ms for 64 MiB here).
// Advice only; ignored where THP is off.
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < int64_t(4) * static_cast<int64_t>(kHuge)) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Validates J (K, P) and returns its dtype index.
int check_J(const at::Tensor& J, const char* op) {
  TORCH_CHECK(J.device().is_cpu(), op, ": J must be a CPU tensor, got device ", J.device());
  TORCH_CHECK(J.dim() == 2, op, ": J must be 2-D (K, P), got shape ", J.sizes());
  const int di = dtype_index(J, op, "J");
  TORCH_CHECK(J.size(1) <= 1 || J.stride(1) == 1, op,
              ": J's last dimension must be contiguous (J.stride(1) == 1), got strides ",
              J.strides());
  TORCH_CHECK(J.size(0) <= 1 || J.stride(0) >= 0, op, ": J has a negative row stride");
  return di;
}

// Largest power of two <= x (x >= 1).
int64_t pow2_floor(int64_t x) {
  int64_t p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}

at::Tensor gram(const at::Tensor& J) {
  const char* op = "mmgrad_C::gram";
  const int di = check_J(J, op);
  const int64_t K = J.size(0), P = J.size(1);
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  at::Tensor out = at::zeros({K, K}, J.options().dtype(acc));
  if (K == 0 || P == 0) return out;
  const GramKernels& gk = gram_kernels();
  const int64_t elt = acc == at::kDouble ? 8 : 4;
  // All of these depend on (K, P, dtype, ISA) only.
  // Tile shape, measured on a 2-core Zen 5 (see the file comment): K <= 4 is one pass, any tile
  // streams well; 5 <= K <= 16 wants small tiles so that every row stream advances steadily and
  // the hardware prefetchers keep up, plus software prefetch a little ahead; larger K is
  // compute-bound and wants an L2-sized tile to amortise the passes.
  int64_t tile, pf_dist;
  if (K <= 4) {
    tile = 1024;
    pf_dist = tile;
  } else if (K <= 16) {
    tile = 64;
    pf_dist = K <= 8 ? tile : 256;
  } else {
    tile = std::min<int64_t>(4096, std::max<int64_t>(64, pow2_floor(kTileBytes / (K * elt))));
    pf_dist = tile;
  }
  const int64_t per_block = (P + kFlushCols * kMaxBlocks - 1) / (kFlushCols * kMaxBlocks);
  const int64_t block = kFlushCols * per_block;
  const int64_t nblocks = (P + block - 1) / block;
  const int R = gk.row_block;
  std::vector<int32_t> pb;
  int64_t nacc = 0;
  for (int64_t i0 = 0; i0 < K; i0 += R) {
    for (int64_t j0 = i0; j0 < K; j0 += R) {
      const int64_t ra = std::min<int64_t>(R, K - i0), rb = std::min<int64_t>(R, K - j0);
      pb.insert(pb.end(), {(int32_t)i0, (int32_t)j0, (int32_t)ra, (int32_t)rb});
      nacc += ra * rb;
    }
  }
  const int64_t ntri = K * (K + 1) / 2;
  std::vector<double> slots(nblocks * ntri);
  const auto kern = gk.gram[di];
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    Scratch tilebuf(K * tile * elt), accm(nacc * gk.vector_bytes), rows(2 * K * sizeof(void*));
    GramArgs a;
    a.J = J.data_ptr();
    a.K = K;
    a.ld = J.stride(0);
    a.P = P;
    a.tile = tile;
    a.pf_dist = pf_dist;
    a.flush = kFlushCols;
    a.pb = pb.data();
    a.npb = (int64_t)pb.size() / 4;
    a.tilebuf = tilebuf.p;
    a.accm = accm.p;
    a.rows = static_cast<const void**>(rows.p);
    for (int64_t blk = b; blk < e; ++blk) {
      a.c0 = blk * block;
      a.c1 = std::min(P, a.c0 + block);
      a.slot = slots.data() + blk * ntri;
      kern(a);
    }
  });
  std::vector<double> total(ntri, 0.0);
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const double* s = slots.data() + blk * ntri;
    for (int64_t t = 0; t < ntri; ++t) total[t] += s[t];
  }
  at::Tensor out64 = acc == at::kDouble ? out : at::empty({K, K}, out.options().dtype(at::kDouble));
  double* o = out64.data_ptr<double>();
  for (int64_t i = 0, t = 0; i < K; ++i) {
    for (int64_t j = i; j < K; ++j, ++t) {
      o[i * K + j] = total[t];
      o[j * K + i] = total[t];
    }
  }
  if (acc != at::kDouble) out.copy_(out64);
  return out;
}

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
  advise_huge_pages(out.data_ptr(), P * out.element_size());
  const GramKernels& gk = gram_kernels();
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
  m.impl("gram", &mmgrad::cpu::gram);
  m.impl("combine", &mmgrad::cpu::combine);
}
