// CPU philox_uniform: counter-based uniforms in [0, 1) (mmgrad.ops.philox_uniform).
//
// out[i] = (r0 >> 8) * 2^-24 with r0 the first output word of Philox4x32-10 on the counter
// (lo32(j), hi32(j), 0, 0) and key (lo32(seed), hi32(seed)), where j = counter + i (no index) or
// counter + index[i], modulo 2^64; packed: word j % 4 of the block at counter j / 4 (j unsigned),
// the positions sharing a block transposed out of one Philox vector. Each value depends on its
// position only, so the output is the
// same for every thread count and ISA. Work is cut into fixed chunks of kChunk outputs, spread over
// threads; within a chunk the Philox rounds run on kW32 counters at once (vectorised per ISA, see
// philox_uniform_kernels.inc).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/output_pool.h"
#include "cpu/philox.h"

namespace mmgrad {
namespace cpu {

// Chunk kernels of one ISA, indexed by output dtype (0 float32, 1 float64).
struct UniformKernels {
  void (*consecutive[2])(uint64_t key, uint64_t base, int64_t n, void* out);
  void (*indexed[2])(uint64_t key, uint64_t base, const int64_t* index, int64_t n, void* out);
  void (*packed_consecutive[2])(uint64_t key, uint64_t base, int64_t n, void* out);
  void (*packed_indexed[2])(uint64_t key, uint64_t base, const int64_t* index, int64_t n, void* out);
};

}  // namespace cpu
}  // namespace mmgrad

#define MMG_KERNEL_FILE "cpu/philox_uniform_kernels.inc"
#include "cpu/for_each_isa.h"

namespace mmgrad {
namespace cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 14;  // outputs per parallel task

const UniformKernels& uniform_kernels() { return MMG_ISA_TABLE(kUniformKernels); }

at::Tensor philox_uniform(const at::Tensor& seed, const at::Tensor& counter, int64_t n,
                          const std::optional<at::Tensor>& index, at::ScalarType dtype,
                          bool packed) {
  const char* op = "mmgrad_C::philox_uniform";
  const uint64_t key = philox_word(seed, "mmgrad_C::philox_uniform", "seed");
  const uint64_t base = philox_word(counter, "mmgrad_C::philox_uniform", "counter");
  TORCH_CHECK(n >= 0, op, ": n must be non-negative, got ", n);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": dtype must be float32 or float64, got ", dtype);
  at::Tensor idx;
  if (index.has_value()) {
    idx = index->contiguous();
    TORCH_CHECK(idx.device().is_cpu(), op, ": index must be a CPU tensor, got device ",
                idx.device());
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == n, op,
                ": index must be an int64 tensor of shape (", n, ",), got ", idx.scalar_type(),
                " of shape ", idx.sizes());
  }
  at::Tensor out = pooled_empty({n}, seed.options().dtype(dtype));
  if (n == 0) return out;
  const UniformKernels& k = uniform_kernels();
  const int d = dtype == at::kDouble ? 1 : 0;
  const int64_t esize = out.element_size();
  char* op_ = static_cast<char*>(out.data_ptr());
  const int64_t* ip = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t i0 = c * kChunk, m = std::min(kChunk, n - i0);
      if (ip == nullptr) {
        (packed ? k.packed_consecutive : k.consecutive)[d](key, base + static_cast<uint64_t>(i0),
                                                            m, op_ + i0 * esize);
      } else {
        (packed ? k.packed_indexed : k.indexed)[d](key, base, ip + i0, m, op_ + i0 * esize);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("philox_uniform", &mmgrad::cpu::philox_uniform);
}
