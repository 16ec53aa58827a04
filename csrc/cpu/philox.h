// Philox4x32-10 scalar helper (mmgrad.reference.philox4x32; round constants in
// philox_constants.h), and the constants of the counter-based Gaussian noise
// (mmgrad.reference.philox_normal).
#pragma once

#include <cstdint>

#include "philox_constants.h"

namespace mmgrad {
namespace cpu {

// First output word of Philox4x32-10 on the counter (lo32(index), hi32(index), 0, 0) with key
// (lo32(key), hi32(key)), as mmgrad.reference.philox4x32.
inline uint32_t philox_r0(uint64_t index, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(c0) * kPhiloxM0;
    const uint64_t p1 = static_cast<uint64_t>(c2) * kPhiloxM1;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return c0;
}

// ln(1 + f) = f - f^2/2 + f^3 * Q(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1]; Q fitted (weighted
// least squares with Lawson iterations) to 6e-9 relative error of ln(1 + f).
constexpr float kLogQ[8] = {0.3333333173296609f,  -0.250008204745169f,  0.20001224031251824f,
                            -0.16623375846020147f, 0.14201837242567236f, -0.1316007503730422f,
                            0.12760956294558246f,  -0.07634007816658152f};
// ln 2 split so that e * kLn2Hi is exact for |e| <= 2^8.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440054690583e-4f;
// sin(pi/2 f) = f * S(f^2) and cos(pi/2 f) = C(f^2) on f in [-1/2, 1/2]; relative errors 3e-9
// and 6e-11 before float rounding.
constexpr float kSinS[4] = {1.5707963217245615f, -0.6459634616487263f, 0.07968005039894026f,
                            -0.004601711384463896f};
constexpr float kCosC[5] = {0.9999999999440893f, -1.2337005395860523f, 0.2536691830607748f,
                            -0.020859939250043376f, 0.0009033699096209647f};

}  // namespace cpu
}  // namespace mmgrad
