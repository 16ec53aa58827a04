// See output_pool.h.
#include "cpu/output_pool.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <deque>
#include <iterator>
#include <mutex>
#include <utility>

namespace mmgrad {
namespace cpu {
namespace {

class OutputPool {
 public:
  // A block of exactly `bytes` (rounded up to 64): the most recently freed one of that size (the
  // likeliest still in cache) if there is, else a new one.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->second == bytes) {
          void* p = it->first;
          held_ -= bytes;
          free_.erase(std::next(it).base());
          return p;
        }
      }
    }
    void* p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p != nullptr, "mmgrad: out of memory allocating a ", bytes, "-byte output");
    return p;
  }

  // Called when the last tensor using the block is freed: keep it, releasing the oldest blocks
  // beyond kPoolBytes.
  void give(void* p, size_t bytes) {
    std::deque<std::pair<void*, size_t>> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.emplace_back(p, bytes);
      held_ += bytes;
      while (held_ > kPoolBytes) {
        release.push_back(free_.front());
        held_ -= free_.front().second;
        free_.pop_front();
      }
    }
    for (auto& block : release) std::free(block.first);
  }

 private:
  std::mutex mutex_;
  std::deque<std::pair<void*, size_t>> free_;  // oldest first
  size_t held_ = 0;
};

OutputPool& pool() {
  // Never destroyed: tensors may outlive static destruction at interpreter exit.
  static OutputPool* p = new OutputPool();
  return *p;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < kPoolMinBytes) return at::empty(sizes, options);
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* data = pool().take(rounded);
  return at::from_blob(
      data, sizes, [rounded](void* q) { pool().give(q, rounded); }, options.device(at::kCPU));
}

}  // namespace cpu
}  // namespace mmgrad
