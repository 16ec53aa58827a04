// CPU graddrop: GradDrop with f = identity in one pass over J (mmgrad.aggregators.graddrop).
//
// Per column p of the (K, P) matrix J: s = sum_i J_ip, a = sum_i |J_ip| (accumulation dtype),
// purity = 0.5 (1 + s / a) (a <= 0 or NaN -> 1), U = the packed uniform of mmgrad.ops.philox_uniform
// at stream position counter + p (counter + index[p] for a shard), row i kept where
// purity > U and J_ip > 0 or purity < U and J_ip < 0, and out_p = sum_i m_i J_ip with m_i = 1 / 0
// (kept / dropped) or, with leak, (1 - leak_i) + leak_i / 0 + leak_i, each rounded in the
// accumulation dtype as the torch path rounds them.
//
// Every column sum (s, a, out) adds its K terms in the order of torch's CPU column sum
// (cascade_sum: runs of 16 rows, more past 2^19 rows, summed from +0; the runs' sums accumulated),
// so the columns that torch sums in its main vectorised loop get the torch path's bits. The
// uniforms are computed inline, bitwise the op's. Each column depends on its own data and position
// only, so the output is the same for every thread count and ISA.
//
// The kernel takes a group of columns at a time (4 vectors), sums its K row pieces as it copies them
// to an L1-resident scratch, decides, and sums the output from the copy: J streams from memory
// once (with software prefetch a few KiB ahead in every row); the uniforms never touch memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/matrix_common.h"
#include "cpu/output_pool.h"
#include "cpu/philox.h"

namespace mmgrad {
namespace cpu {

struct GradDropArgs {
  const void* J;             // first column of this call
  int64_t K, ld;             // rows, row stride in elements
  int64_t n;                 // columns, a multiple of the kernel's group width
  int level_power;           // rows per summation run = 2^level_power (torch's cascade)
  uint64_t key;              // Philox key (the seed)
  uint64_t first;            // stream position of the first column (index == nullptr)
  const int64_t* index;      // else the columns' offsets, added to `base`
  uint64_t base;             // the stream counter
  const void* keep_w;        // K multipliers of kept entries (accumulation dtype); nullptr: 1
  const void* drop_w;        // K multipliers of dropped entries; nullptr: 0
  void* out;                 // n outputs in J's dtype
  bool stream_out;           // non-temporal output stores (out 64-byte aligned)
  int64_t prefetch;          // columns ahead of the current group to prefetch (prefetches never
                             // fault, so reaching past the end of J is harmless)
  void* group_copy;          // scratch: K * group accumulation-type elements
};

struct GradDropKernels {
  void (*run[4])(const GradDropArgs& a);  // by DtypeIndex
  int64_t group[4];                       // columns per group, by DtypeIndex
};

}  // namespace cpu
}  // namespace mmgrad

#define MMG_KERNEL_FILE "cpu/graddrop_kernels.inc"
#include "cpu/for_each_isa.h"

namespace mmgrad {
namespace cpu {
namespace {

// Columns per parallel task (a multiple of every group width).
constexpr int64_t kTaskColumns = int64_t(1) << 13;
// Software prefetch distance per row at K >= 32 (half of it below): measured on the 2-core Zen 5
// development machine (K = 64, P = 1M, float32, one thread: 18.7 ms without, 11.6 ms with).
constexpr int64_t kPrefetchBytes = int64_t(4) << 10;
// Outputs at least this large bypass the cache (written once, not read back here).
constexpr int64_t kStreamOutBytes = int64_t(16) << 20;

const GradDropKernels& graddrop_kernels() { return MMG_ISA_TABLE(kGradDropKernels); }

// torch's cascade_sum run length: 2^max(4, ceil(log2 K) / 4).
int level_power(int64_t K) {
  int ceil_log2 = 0;
  while ((int64_t(1) << ceil_log2) < K) ++ceil_log2;
  return std::max(4, ceil_log2 / 4);
}

template <typename A>
void leak_multipliers(const at::Tensor& leak, at::Tensor& keep_w, at::Tensor& drop_w) {
  // As the torch path: keep * (1 - leak) + leak, in the accumulation dtype.
  const int64_t K = leak.size(0);
  const A* lk = leak.const_data_ptr<A>();
  A* kw = keep_w.mutable_data_ptr<A>();
  A* dw = drop_w.mutable_data_ptr<A>();
  for (int64_t i = 0; i < K; ++i) {
    const A one_minus = A(1) - lk[i];
    kw[i] = one_minus + lk[i];
    dw[i] = A(0) + lk[i];
  }
}

at::Tensor graddrop(const at::Tensor& J_in, const at::Tensor& seed, const at::Tensor& counter,
                    const std::optional<at::Tensor>& leak, const std::optional<at::Tensor>& index) {
  const char* op = "mmgrad_C::graddrop";
  TORCH_CHECK(J_in.dim() == 2, op, ": J must be 2-D (K, P), got shape ", J_in.sizes());
  const at::Tensor J = J_in.size(1) <= 1 || J_in.stride(1) == 1 ? J_in : J_in.contiguous();
  const int di = check_J(J, op);
  const int64_t K = J.size(0), P = J.size(1);
  TORCH_CHECK(K >= 1, op, ": J must have at least one row");
  const uint64_t key = philox_word(seed, op, "seed");
  const uint64_t base = philox_word(counter, op, "counter");
  const at::ScalarType acc = accumulation_dtype(J.scalar_type());
  at::Tensor keep_w, drop_w;
  if (leak.has_value()) {
    TORCH_CHECK(leak->device().is_cpu(), op, ": leak must be a CPU tensor, got device ",
                leak->device());
    TORCH_CHECK(leak->dim() == 1 && leak->size(0) == K && leak->scalar_type() == acc, op,
                ": leak must be a ", acc, " tensor of shape (", K, ",) (J's accumulation dtype), got ",
                leak->scalar_type(), " of shape ", leak->sizes());
    const at::Tensor lk = leak->contiguous();
    keep_w = at::empty({K}, lk.options());
    drop_w = at::empty({K}, lk.options());
    if (acc == at::kDouble) {
      leak_multipliers<double>(lk, keep_w, drop_w);
    } else {
      leak_multipliers<float>(lk, keep_w, drop_w);
    }
  }
  at::Tensor idx;
  if (index.has_value()) {
    idx = index->contiguous();
    TORCH_CHECK(idx.device().is_cpu(), op, ": index must be a CPU tensor, got device ",
                idx.device());
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == P, op,
                ": index must be an int64 tensor of shape (", P, ",), got ", idx.scalar_type(),
                " of shape ", idx.sizes());
  }
  at::Tensor out = pooled_empty({P}, J.options());
  if (P == 0) return out;

  const GradDropKernels& gk = graddrop_kernels();
  const auto run = gk.run[di];
  const int64_t group = gk.group[di];
  const int64_t esize = J.element_size();
  const int64_t elt = acc == at::kDouble ? 8 : 4;
  GradDropArgs proto;
  proto.K = K;
  proto.prefetch = (K >= 32 ? kPrefetchBytes : kPrefetchBytes / 2) / esize;
  proto.level_power = level_power(K);
  proto.key = key;
  proto.base = base;
  proto.keep_w = keep_w.defined() ? keep_w.const_data_ptr() : nullptr;
  proto.drop_w = drop_w.defined() ? drop_w.const_data_ptr() : nullptr;
  const char* Jp = static_cast<const char*>(J.const_data_ptr());
  char* outp = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* ip = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
  const bool stream_out =
      P * esize >= kStreamOutBytes && reinterpret_cast<uintptr_t>(outp) % 64 == 0;

  // Whole groups, in tasks of kTaskColumns.
  const int64_t full = P / group * group;
  const int64_t ntasks = (full + kTaskColumns - 1) / kTaskColumns;
  at::parallel_for(0, ntasks, 1, [&](int64_t b, int64_t e) {
    GradDropArgs a = proto;
    Scratch group_copy(K * group * elt);
    a.group_copy = group_copy.p;
    a.ld = J.stride(0);
    a.stream_out = stream_out;
    for (int64_t t = b; t < e; ++t) {
      const int64_t c0 = t * kTaskColumns;
      a.n = std::min(kTaskColumns, full - c0);
      a.J = Jp + c0 * esize;
      a.first = base + static_cast<uint64_t>(c0);
      a.index = ip == nullptr ? nullptr : ip + c0;
      a.out = outp + c0 * esize;
      run(a);
    }
  });

  // The ragged end: one group of zero-padded copies (their columns are computed and dropped).
  if (full < P) {
    const int64_t m = P - full;
    at::Tensor tail = at::zeros({K, group}, J.options());
    tail.narrow(1, 0, m).copy_(J.narrow(1, full, m));
    at::Tensor tail_out = at::empty({group}, J.options());
    at::Tensor tail_index;
    GradDropArgs a = proto;
    Scratch group_copy(K * group * elt);
    a.group_copy = group_copy.p;
    a.J = tail.const_data_ptr();
    a.ld = group;
    a.n = group;
    a.first = base + static_cast<uint64_t>(full);
    a.index = nullptr;
    if (ip != nullptr) {
      tail_index = at::zeros({group}, idx.options());
      tail_index.narrow(0, 0, m).copy_(idx.narrow(0, full, m));
      a.index = tail_index.const_data_ptr<int64_t>();
    }
    a.out = tail_out.mutable_data_ptr();
    a.stream_out = false;
    run(a);
    std::memcpy(outp + full * esize, tail_out.const_data_ptr(), m * esize);
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("graddrop", &mmgrad::cpu::graddrop);
}
