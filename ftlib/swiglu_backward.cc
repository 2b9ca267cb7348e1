// SwiGLU's backward (Llama's MLP: h = silu(gate) * up) in one pass over its three
// inputs, as an XLA FFI custom call. Built and registered by ftlib/swiglu_backward.py;
// the elements are split across XLA's intra-op pool.
//
// Why: XLA:CPU runs it as three or four passes over [tokens, intermediate], the
// sigmoid materialized in between (benchmarks/README.md has the timings).
//
//   ftlib_swiglu_backward: gate, up, dh f32 (same shape) ->
//     dgate = dh * up * s * (1 + gate * (1 - s)), dup = dh * gate * s, s = sigmoid(gate)

#include <cstdint>

#include "cpu_math.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

FTLIB_VECTOR_CLONES void Range(
    const float* gate, const float* up, const float* dh, float* dgate, float* dup, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i], s = ftlib::Sigmoid(g), d = dh[i];
    dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
    dup[i] = d * g * s;
  }
}

constexpr int64_t kUnit = 1 << 14;  // elements per work unit (64 KB per array)

ffi::Error SwigluBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate,
                          ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> dh,
                          ffi::ResultBuffer<ffi::F32> dgate, ffi::ResultBuffer<ffi::F32> dup) {
  const int64_t n = gate.element_count();
  if (up.element_count() != n || dh.element_count() != n) {
    return ffi::Error::InvalidArgument("ftlib_swiglu_backward: operands differ in size");
  }
  const float *g = gate.typed_data(), *u = up.typed_data(), *d = dh.typed_data();
  float *dg = dgate->typed_data(), *du = dup->typed_data();
  ftlib::ParallelForChunks(pool, n, kUnit, [=](int64_t, int64_t lo, int64_t hi) {
    Range(g + lo, u + lo, d + lo, dg + lo, du + lo, hi - lo);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSwigluBackward, SwigluBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
