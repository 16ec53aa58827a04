// CPU segment ops: segment_moments, segment_scale_ (with Philox noise), segment_lerp_.
//
// Work is split into chunks of at most kChunk elements of one segment, listed on the host in
// segment order. The chunking depends only on the segment table, never on the thread count, and
// per-chunk partial moments are summed per segment in chunk order, so results are bitwise
// reproducible for any torch.get_num_threads().
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/philox.h"
#include "segment_table.h"

#define MMG_KERNEL_FILE "cpu/segment_kernels.inc"
#include "cpu/for_each_isa.h"

namespace mmgrad {
namespace cpu {

const SegmentKernels& segment_kernels() { return MMG_ISA_TABLE(kSegmentKernels); }

namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // elements per work item
constexpr int64_t kTaskElems = int64_t(1) << 15;  // elements per parallel task, roughly

struct Chunk {
  int64_t seg, start, len;
};

struct Table {
  std::vector<Chunk> chunks;
  std::vector<int64_t> seg_first;  // chunks of segment s: [seg_first[s], seg_first[s + 1])
  int64_t total = 0;               // elements in all segments
};

void check_data(const at::Tensor& x, const char* op, const char* arg) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got device ",
              x.device());
  TORCH_CHECK(x.dim() == 1, op, ": ", arg, " must be 1-D (a flat buffer), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", arg, " must be contiguous");
  dtype_index(x, op, arg);
}

// Per-segment parameter: (S,) CPU tensor in the accumulation dtype.
at::Tensor check_param(const at::Tensor& t, int64_t S, at::ScalarType acc, const char* op,
                       const char* arg) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == S, op, ": ", arg,
              " must have shape (S,) = (", S, ",) like offsets, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", arg, " must be ", acc,
              " (the accumulation dtype of x), got ", t.scalar_type());
  return t.contiguous();
}

// Validates the segment table against a buffer of N elements (every segment inside it, none
// overlapping another: the contract of every backend) and lists the chunks.
Table make_table(const at::Tensor& offsets, const at::Tensor& numels, int64_t N, const char* op) {
  check_segment_table(offsets, numels, at::Device(at::kCPU), op);
  const at::Tensor off_c = offsets.contiguous(), num_c = numels.contiguous();
  const int64_t* off = off_c.data_ptr<int64_t>();
  const int64_t* num = num_c.data_ptr<int64_t>();
  const int64_t S = offsets.numel();
  Table t;
  t.seg_first.resize(S + 1);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(off[s] >= 0 && num[s] >= 0, op, ": segment ", s,
                " has a negative offset or numel (", off[s], ", ", num[s], ")");
    TORCH_CHECK(num[s] == 0 || num[s] <= N - off[s], op, ": segment ", s, " [", off[s], ", ",
                off[s], " + ", num[s], ") runs past the end of the buffer of ", N,
                " elements");
    t.seg_first[s] = static_cast<int64_t>(t.chunks.size());
    for (int64_t a = 0; a < num[s]; a += kChunk) {
      t.chunks.push_back({s, off[s] + a, std::min(kChunk, num[s] - a)});
    }
    t.total += num[s];
  }
  t.seg_first[S] = static_cast<int64_t>(t.chunks.size());
  check_disjoint_segments(off, num, S, op);
  return t;
}

// Runs f(begin, end) over ranges of chunks; which thread runs which range never changes results.
template <typename F>
void for_chunks(const Table& t, const F& f) {
  const int64_t n = static_cast<int64_t>(t.chunks.size());
  if (n == 0) return;
  const int64_t avg = std::max<int64_t>(1, t.total / n);
  const int64_t grain = std::max<int64_t>(1, kTaskElems / avg);
  at::parallel_for(0, n, grain, f);
}

at::Tensor segment_moments(const at::Tensor& x, const at::Tensor& offsets,
                           const at::Tensor& numels) {
  const char* op = "mmgrad_C::segment_moments";
  check_data(x, op, "x");
  const int di = dtype_index(x, op, "x");
  const Table t = make_table(offsets, numels, x.numel(), op);
  const int64_t S = offsets.numel();
  std::vector<double> part(2 * t.chunks.size());
  const auto kern = segment_kernels().moments[di];
  const char* base = static_cast<const char*>(x.data_ptr());
  const int64_t es = x.element_size();
  for_chunks(t, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = t.chunks[i];
      kern(base + c.start * es, c.len, &part[2 * i]);
    }
  });
  at::Tensor out = at::zeros({S, 2}, x.options().dtype(accumulation_dtype(x.scalar_type())));
  at::Tensor out64 = out.scalar_type() == at::kDouble ? out : at::zeros({S, 2}, out.options().dtype(at::kDouble));
  double* o = out64.data_ptr<double>();
  for (int64_t s = 0; s < S; ++s) {
    double sum = 0.0, sq = 0.0;
    for (int64_t i = t.seg_first[s]; i < t.seg_first[s + 1]; ++i) {
      sum += part[2 * i];
      sq += part[2 * i + 1];
    }
    o[2 * s] = sum;
    o[2 * s + 1] = sq;
  }
  if (out64.data_ptr() != out.data_ptr()) out.copy_(out64);
  return out;
}

void segment_scale_(at::Tensor& x, const at::Tensor& offsets, const at::Tensor& numels,
                    const at::Tensor& scale, const c10::optional<at::Tensor>& noise_std,
                    const c10::optional<at::Tensor>& seed) {
  const char* op = "mmgrad_C::segment_scale_";
  check_data(x, op, "x");
  const int di = dtype_index(x, op, "x");
  const at::ScalarType acc = accumulation_dtype(x.scalar_type());
  const Table t = make_table(offsets, numels, x.numel(), op);
  const int64_t S = offsets.numel();
  const at::Tensor sc64 = check_param(scale, S, acc, op, "scale").to(at::kDouble);
  const double* sc = sc64.data_ptr<double>();
  const SegmentKernels& k = segment_kernels();
  char* base = static_cast<char*>(x.data_ptr());
  const int64_t es = x.element_size();
  if (!noise_std.has_value()) {
    const auto kern = k.scale[di];
    for_chunks(t, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Chunk& c = t.chunks[i];
        kern(base + c.start * es, c.len, sc[c.seg]);
      }
    });
    return;
  }
  TORCH_CHECK(seed.has_value(), op, ": seed is required when noise_std is given");
  const at::Tensor& sd_t = *noise_std;
  const at::Tensor sd64 = check_param(sd_t, S, acc, op, "noise_std").to(at::kDouble);
  const double* sd = sd64.data_ptr<double>();
  const uint64_t key = philox_word(*seed, op, "seed");
  const auto kern = k.scale_noise[di];
  const int64_t nbuf = k.noise_buf;
  for_chunks(t, [&](int64_t b, int64_t e) {
    std::vector<float> buf(nbuf);
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = t.chunks[i];
      kern(base + c.start * es, c.len, c.start, sc[c.seg], sd[c.seg], key, buf.data());
    }
  });
}

void segment_lerp_(at::Tensor& x, const at::Tensor& y, const at::Tensor& offsets,
                   const at::Tensor& numels, const at::Tensor& weight) {
  const char* op = "mmgrad_C::segment_lerp_";
  check_data(x, op, "x");
  check_data(y, op, "y");
  const int di = dtype_index(x, op, "x");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": y must have x's dtype ",
              x.scalar_type(), ", got ", y.scalar_type());
  TORCH_CHECK(y.numel() == x.numel(), op, ": y must have as many elements as x (", x.numel(),
              "), got ", y.numel());
  const at::ScalarType acc = accumulation_dtype(x.scalar_type());
  const Table t = make_table(offsets, numels, x.numel(), op);
  const int64_t S = offsets.numel();
  const at::Tensor w = check_param(weight, S, acc, op, "weight");
  // 1 - w is rounded in the accumulation dtype, as the reference does.
  const at::Tensor w64 = w.to(at::kDouble), omw64 = (1 - w).to(at::kDouble);
  const double* wp = w64.data_ptr<double>();
  const double* omwp = omw64.data_ptr<double>();
  const auto kern = segment_kernels().lerp[di];
  char* xb = static_cast<char*>(x.data_ptr());
  const char* yb = static_cast<const char*>(y.data_ptr());
  const int64_t es = x.element_size();
  for_chunks(t, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = t.chunks[i];
      kern(xb + c.start * es, yb + c.start * es, c.len, wp[c.seg], omwp[c.seg]);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace mmgrad

TORCH_LIBRARY_IMPL(mmgrad_C, CPU, m) {
  m.impl("segment_moments", &mmgrad::cpu::segment_moments);
  m.impl("segment_scale_", &mmgrad::cpu::segment_scale_);
  m.impl("segment_lerp_", &mmgrad::cpu::segment_lerp_);
}
