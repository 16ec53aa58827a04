// CPU gram (J J^T).
//
// Columns are split into work blocks whose size depends only on (K, P), never on the thread
// count; each block writes its upper-triangle partial (double) into its own slot and the slots
// are summed in block order, so the result is bitwise reproducible for any thread count. Inside
// a block, a cache-resident tile of columns is swept once per 4x4 (AVX-512) or 3x3 block of row
// pairs with register accumulators (see gram_kernels.inc).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/matrix_common.h"

#define MMG_KERNEL_FILE "cpu/gram_kernels.inc"
#include "cpu/for_each_isa.h"

namespace mmgrad {
namespace cpu {

const GramKernels& gram_kernels() { return MMG_ISA_TABLE(kGramKernels); }

namespace {

constexpr int64_t kFlushCols = int64_t(1) << 13;  // fp32 lanes sum at most 8K columns / W
constexpr int64_t kBlockCols = int64_t(1) << 16;  // work block (a multiple of every tile)
constexpr int64_t kMaxBlocks = 1024;               // bounds the slot memory for huge P
constexpr int64_t kTileBytes = int64_t(1) << 17;   // large-K tile of K rows, in L2

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
  const int64_t per_block = (P + kBlockCols * kMaxBlocks - 1) / (kBlockCols * kMaxBlocks);
  const int64_t block = kBlockCols * per_block;
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
    Scratch tilebuf(K * tile * elt), accm(nacc * gk.vector_bytes),
        dacc(nacc * gk.vector_bytes / elt * sizeof(double)), rows(K * sizeof(void*));
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
    a.dacc = dacc.p;
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

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("gram", &mmgrad::cpu::gram);
}
