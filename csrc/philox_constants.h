// The Philox4x32-10 round constants (Salmon et al., SC 2011), shared by the CPU kernels
// (csrc/cpu/philox.h) and the CUDA kernels (kernels/philox.cuh). The generator itself is defined by
// mmgrad.reference.philox4x32.
#pragma once

#include <cstdint>

namespace mmgrad {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments (Weyl sequence)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

}  // namespace mmgrad
