// SwiGLU's backward (Llama's MLP: h = silu(gate) * up) in one pass over its three
// inputs, as an XLA FFI custom call. Built and registered by ftlib/swiglu_backward.py;
// the elements are split across XLA's intra-op pool.
//
// Why: XLA:CPU runs it as three or four passes over [tokens, intermediate], the
// sigmoid materialized in between (benchmarks/README.md has the timings).
//
//   ftlib_swiglu_backward: gate, up, dh f32 (same shape) ->
//     dgate = dh * up * s * (1 + gate * (1 - s)), dup = dh * gate * s, s = sigmoid(gate)
//   ftlib_swiglu_backward_h: the same, and h = gate * s * up, the forward's output,
//     recomputed for the down projection's weight gradients (models/products.py)

#include <cstdint>

#include "cpu_math.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// h is written only when asked for (kWithH): a store stream costs as much as a load.
template <bool kWithH>
FTLIB_VECTOR_CLONES void Range(const float* gate, const float* up, const float* dh,
                               float* dgate, float* dup, float* h, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i], s = ftlib::Sigmoid(g), d = dh[i];
    dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
    dup[i] = d * g * s;
    if constexpr (kWithH) h[i] = g * s * up[i];
  }
}

constexpr int64_t kUnit = 1 << 14;  // elements per work unit (64 KB per array)

template <bool kWithH>
ffi::Error Backward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& gate,
                    ffi::Buffer<ffi::F32>& up, ffi::Buffer<ffi::F32>& dh, float* dg, float* du,
                    float* hh) {
  const int64_t n = gate.element_count();
  if (up.element_count() != n || dh.element_count() != n) {
    return ffi::Error::InvalidArgument("ftlib_swiglu_backward(_h): operands differ in size");
  }
  const float *g = gate.typed_data(), *u = up.typed_data(), *d = dh.typed_data();
  ftlib::ParallelForChunks(pool, n, kUnit, [=](int64_t, int64_t lo, int64_t hi) {
    Range<kWithH>(g + lo, u + lo, d + lo, dg + lo, du + lo, kWithH ? hh + lo : nullptr,
                  hi - lo);
  });
  return ffi::Error::Success();
}

ffi::Error SwigluBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate,
                          ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> dh,
                          ffi::ResultBuffer<ffi::F32> dgate, ffi::ResultBuffer<ffi::F32> dup) {
  return Backward<false>(pool, gate, up, dh, dgate->typed_data(), dup->typed_data(), nullptr);
}

ffi::Error SwigluBackwardH(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate,
                           ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> dh,
                           ffi::ResultBuffer<ffi::F32> dgate, ffi::ResultBuffer<ffi::F32> dup,
                           ffi::ResultBuffer<ffi::F32> h) {
  return Backward<true>(pool, gate, up, dh, dgate->typed_data(), dup->typed_data(),
                        h->typed_data());
}

// gate, up, dh -> dgate, dup (and h): both targets' buffers.
auto Bind() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSwigluBackward, SwigluBackward, Bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSwigluBackwardH, SwigluBackwardH,
                              Bind().Ret<ffi::Buffer<ffi::F32>>());
