// CPU feature detection and the shared dtype helpers of the CPU ops.
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace mmgrad {
namespace cpu {

static Isa detect() {
#if MMG_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt");
  // libgcc also checks that the OS saves the AVX / AVX-512 register state.
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  Isa best = avx512 ? Isa::Avx512 : avx2 ? Isa::Avx2 : Isa::Default;
#else
  Isa best = Isa::Default;
#endif
  const char* env = std::getenv("MMGRAD_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    Isa want = best;
    if (std::strcmp(env, "default") == 0 || std::strcmp(env, "generic") == 0) {
      want = Isa::Default;
    } else if (std::strcmp(env, "avx2") == 0) {
      want = Isa::Avx2;
    } else if (std::strcmp(env, "avx512") == 0) {
      want = Isa::Avx512;
    } else {
      TORCH_WARN("mmgrad: ignoring MMGRAD_CPU_ISA=", env, " (use avx512, avx2 or default)");
    }
    // The variable can only lower the ISA: asking for more than the CPU has would crash.
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

Isa cpu_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

int dtype_index(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return kHalf;
    case at::kBFloat16:
      return kBF16;
    case at::kFloat:
      return kFloat;
    case at::kDouble:
      return kDouble;
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
  return -1;
}

uint64_t philox_word(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 1, op, ": ", arg,
              " must be an int64 tensor with one element, got ", t.scalar_type(), " with ",
              t.numel(), " elements");
  return static_cast<uint64_t>(t.reshape({}).item<int64_t>());
}

}  // namespace cpu
}  // namespace mmgrad
