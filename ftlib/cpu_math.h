// Vectorizable float math shared by ftlib's elementwise C++ kernels.
#ifndef FTLIB_CPU_MATH_H_
#define FTLIB_CPU_MATH_H_

#include <cstdint>
#include <cstring>

// Loops compiled for AVX-512, AVX2 and baseline x86-64, the best picked when the library
// loads (an ifunc: x86-64 Linux). Elsewhere the compiler's default target only.
#if defined(__x86_64__) && defined(__linux__)
#define FTLIB_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FTLIB_VECTOR_CLONES
#endif

namespace ftlib {

// exp(x) for x <= 0: Cody-Waite reduction to r in [-ln2/2, ln2/2], a degree-6
// polynomial for e^r (Cephes' expf coefficients), and 2^n built in the exponent bits.
// Rounding by adding 1.5 * 2^23 vectorizes, unlike roundf. Below -87 the result would
// be denormal: clamped there (e^-87 ~ 1.6e-38, negligible next to any 1 it meets).
inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1 / (1 + e^-x), from e^-|x| so the exponential never overflows.
inline float Sigmoid(float x) {
  float e = ExpNonPositive(x < 0.0f ? x : -x);
  float s = 1.0f / (1.0f + e);
  return x < 0.0f ? e * s : s;
}

}  // namespace ftlib

#endif  // FTLIB_CPU_MATH_H_
