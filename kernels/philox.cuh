// Counter-based Gaussian noise, identical in definition to mmgrad.reference.philox_normal:
// element i of a flat buffer uses Philox4x32-10 block i >> 2 (counter (lo32, hi32, 0, 0) of the
// block index, key (lo32(seed), hi32(seed))); the block's outputs r0..r3 make two Box-Muller
// pairs, (r0, r1) for elements 0 (cos) and 1 (sin), (r2, r3) for elements 2 (cos) and 3 (sin).
// Evaluated in float32 with IEEE logf / sqrtf and sincospif (no fast-math approximations).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "philox_constants.h"  // csrc/: the round constants the CPU kernels use too

namespace mmgrad {
namespace cuda {

__device__ __forceinline__ uint4 philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = __umulhi(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = __umulhi(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return make_uint4(c0, c1, c2, c3);
}

// One Box-Muller pair: u = ((ru >> 8) + 1) / 2^24 in (0, 1], v = (rv >> 8) / 2^24 in [0, 1);
// z_cos = sqrt(-2 ln u) cos(2 pi v), z_sin = sqrt(-2 ln u) sin(2 pi v). u and 2v are exact in
// float32; sincospif(2v) reduces by exact multiples of pi.
__device__ __forceinline__ void box_muller(uint32_t ru, uint32_t rv, float& z_cos, float& z_sin) {
  const float u = __uint2float_rn((ru >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
  const float two_v = __uint2float_rn(rv >> 8) * 1.1920928955078125e-07f;    // 2^-23
  const float radius = sqrtf(-2.0f * logf(u));
  float s, c;
  sincospif(two_v, &s, &c);
  z_cos = radius * c;
  z_sin = radius * s;
}

// The four normals of Philox block `block` (elements 4 block .. 4 block + 3), in element order.
__device__ __forceinline__ void philox_normal4(uint64_t block, uint64_t key, float (&z)[4]) {
  const uint4 r = philox4x32_10(block, key);
  box_muller(r.x, r.y, z[0], z[1]);
  box_muller(r.z, r.w, z[2], z[3]);
}

}  // namespace cuda
}  // namespace mmgrad
