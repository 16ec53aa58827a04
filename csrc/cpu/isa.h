// Runtime ISA dispatch and portable SIMD vector types for the CPU kernels.
//
// Kernels are written once (GCC vector extensions, vector width VB bytes) in a *_kernels.inc file
// that for_each_isa.h includes three times: inside `#pragma GCC target("avx512...")` as namespace
// avx512 (VB=64), inside target("avx2") as namespace avx2 (VB=32), and for the baseline x86-64 as
// namespace generic (VB=16). The binary runs on any x86-64 machine and picks the best variant at
// run time (cpu_isa()); no -march flag is needed.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#define MMG_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#define MMG_X86 1
#include <immintrin.h>
#else
#define MMG_X86 0
#endif

// 64-byte vector types are passed between always-inline helpers only; the ABI note is noise.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mmgrad {
namespace cpu {

enum class Isa { Default = 0, Avx2 = 1, Avx512 = 2 };

// Best ISA of this CPU, lowered by the environment variable MMGRAD_CPU_ISA=avx512|avx2|default
// (read once; used by the tests to exercise every code path on one machine).
Isa cpu_isa();
const char* isa_name(Isa isa);

// The kernel table `name` of the ISA cpu_isa() picks, among the per-ISA copies for_each_isa.h
// makes of a kernel file (namespaces avx512, avx2, generic).
#if MMG_X86
#define MMG_ISA_TABLE(name)                                 \
  (cpu_isa() == ::mmgrad::cpu::Isa::Avx512 ? avx512::name  \
   : cpu_isa() == ::mmgrad::cpu::Isa::Avx2 ? avx2::name    \
                                           : generic::name)
#else
#define MMG_ISA_TABLE(name) (generic::name)
#endif

// Vector types of VB bytes. The typedefs live in a struct because GCC drops vector_size on
// dependent alias templates.
template <int VB>
struct V {
  typedef float f32 __attribute__((vector_size(VB)));
  typedef double f64 __attribute__((vector_size(VB)));
  typedef int32_t i32 __attribute__((vector_size(VB)));
  typedef uint32_t u32 __attribute__((vector_size(VB)));
  typedef uint64_t u64 __attribute__((vector_size(VB)));
  typedef uint16_t u16h __attribute__((vector_size(VB / 2)));  // as many lanes as f32
  static constexpr int kF32 = VB / 4;
  static constexpr int kF64 = VB / 8;
};

// Vector of scalar type A (float or double) with VB bytes.
template <int VB, typename A>
struct VecOf;
template <int VB>
struct VecOf<VB, float> {
  typedef typename V<VB>::f32 type;
};
template <int VB>
struct VecOf<VB, double> {
  typedef typename V<VB>::f64 type;
};

template <typename Vec, typename T>
MMG_INLINE Vec loadu(const T* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
template <typename Vec, typename T>
MMG_INLINE void storeu(T* p, const Vec& v) {
  std::memcpy(p, &v, sizeof(Vec));
}
template <typename To, typename From>
MMG_INLINE To bitcast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bitcast size");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

// ---- 16-bit float conversions on whole vectors (GCC 12 does not vectorise _Float16 casts) ----

// IEEE half bits -> float, exact (normals, subnormals, inf, NaN).
template <int VB>
MMG_INLINE typename V<VB>::f32 half_to_float(typename V<VB>::u16h h16) {
  typedef typename V<VB>::u32 U;
  typedef typename V<VB>::f32 F;
  U h = __builtin_convertvector(h16, U);
  U o = (h & 0x7fffu) << 13;  // exponent and mantissa in float position
  U exp = o & 0x0f800000u;
  o += (127u - 15u) << 23;                                     // rebias the exponent
  U is_inf_nan = (U)(exp == 0x0f800000u);                      // all-ones lanes
  U is_sub = (U)(exp == 0u);
  o += is_inf_nan & ((128u - 16u) << 23);                      // exponent to 255
  // Subnormals and zero: renormalise through one exact float subtraction.
  U sub = bitcast<U>(bitcast<F>(o + (1u << 23)) - bitcast<F>(U{} + (113u << 23)));
  o = (is_sub & sub) | (~is_sub & o);
  return bitcast<F>(o | ((h & 0x8000u) << 16));
}

// float -> IEEE half bits, round to nearest even; NaN -> 0x7e00, overflow -> inf.
template <int VB>
MMG_INLINE typename V<VB>::u16h float_to_half(typename V<VB>::f32 f) {
  typedef typename V<VB>::u32 U;
  typedef typename V<VB>::f32 F;
  U u = bitcast<U>(f);
  U sign = u & 0x80000000u;
  u ^= sign;
  const U f16max = U{} + ((127u + 16u) << 23);
  const U denorm_magic = U{} + (((127u - 15u) + (23u - 10u) + 1u) << 23);
  U big = (U)(u >= f16max);
  U nan = (U)(u > 0x7f800000u);
  U r_big = (nan & 0x7e00u) | (~nan & 0x7c00u);
  U tiny = (U)(u < (113u << 23));
  // Results below the smallest normal half: the float addition does the rounding.
  U r_tiny = bitcast<U>(bitcast<F>(u) + bitcast<F>(denorm_magic)) - denorm_magic;
  U mant_odd = (u >> 13) & 1u;
  U r_norm = (u + (((15u - 127u) << 23) + 0xfffu) + mant_odd) >> 13;
  U r = (big & r_big) | (~big & ((tiny & r_tiny) | (~tiny & r_norm)));
  r |= sign >> 16;
  return __builtin_convertvector(r, typename V<VB>::u16h);
}

template <int VB>
MMG_INLINE typename V<VB>::f32 bf16_to_float(typename V<VB>::u16h h16) {
  typedef typename V<VB>::u32 U;
  return bitcast<typename V<VB>::f32>(__builtin_convertvector(h16, U) << 16);
}

// float -> bfloat16 bits, round to nearest even, NaN -> 0x7fc0 (as c10::BFloat16).
template <int VB>
MMG_INLINE typename V<VB>::u16h float_to_bf16(typename V<VB>::f32 f) {
  typedef typename V<VB>::u32 U;
  U u = bitcast<U>(f);
  U nan = (U)(f != f);
  U r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (nan & 0x7fc0u) | (~nan & r);
  return __builtin_convertvector(r, typename V<VB>::u16h);
}

// Storage types. Half and bfloat16 are raw uint16 bits; the tags tell them apart.
struct Half {
  uint16_t x;
};
struct BF16 {
  uint16_t x;
};

// Load kF32 (float accumulation) or kF64 (double) consecutive elements as an accumulator vector.
template <int VB, typename T>
struct Io;

template <int VB>
struct Io<VB, float> {
  typedef float acc;
  typedef typename V<VB>::f32 vec;
  static constexpr int W = V<VB>::kF32;
  static MMG_INLINE vec load(const float* p) { return loadu<vec>(p); }
  static MMG_INLINE void store(float* p, const vec& v) { storeu(p, v); }
};
template <int VB>
struct Io<VB, double> {
  typedef double acc;
  typedef typename V<VB>::f64 vec;
  static constexpr int W = V<VB>::kF64;
  static MMG_INLINE vec load(const double* p) { return loadu<vec>(p); }
  static MMG_INLINE void store(double* p, const vec& v) { storeu(p, v); }
};
template <int VB>
struct Io<VB, Half> {
  typedef float acc;
  typedef typename V<VB>::f32 vec;
  static constexpr int W = V<VB>::kF32;
  static MMG_INLINE vec load(const Half* p) {
    return half_to_float<VB>(loadu<typename V<VB>::u16h>(p));
  }
  static MMG_INLINE void store(Half* p, const vec& v) { storeu(p, float_to_half<VB>(v)); }
};
template <int VB>
struct Io<VB, BF16> {
  typedef float acc;
  typedef typename V<VB>::f32 vec;
  static constexpr int W = V<VB>::kF32;
  static MMG_INLINE vec load(const BF16* p) {
    return bf16_to_float<VB>(loadu<typename V<VB>::u16h>(p));
  }
  static MMG_INLINE void store(BF16* p, const vec& v) { storeu(p, float_to_bf16<VB>(v)); }
};

}  // namespace cpu
}  // namespace mmgrad
