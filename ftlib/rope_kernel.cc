// Rotary position embedding (HF's rotate-half form) applied to a [rows, heads, H] slab in
// one pass, as an XLA FFI custom call. Built and registered by ftlib/rope_kernel.py;
// rows are split across XLA's intra-op pool.
//
// Why: XLA:CPU fuses the cos/sin of the tables into every consumer, recomputing both
// once per head, per layer and per direction where nothing stops it (the layer loop:
// llama-small's 32 RoPE fusions took ~7 ms each instead of ~1). As a custom call's
// operands the tables are computed once.
//
//   ftlib_rope: x [R, N, H], cos [R, H], sin [R, H] -> y [R, N, H], with lo/hi the two
//     halves of the last dim:
//     forward  (inverse=0): y_lo = x_lo c_lo - x_hi s_lo,  y_hi = x_hi c_hi + x_lo s_hi
//     transpose (inverse=1): y_lo = x_lo c_lo + x_hi s_hi,  y_hi = x_hi c_hi - x_lo s_lo
//   (the transpose is the forward's backward: dx for the cotangent x).

#include <cstdint>

#include "cpu_math.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerUnit = 64;

FTLIB_VECTOR_CLONES void Rows(const float* x, const float* cos, const float* sin, int64_t rows,
                              int64_t N, int64_t H, bool inverse, float* y) {
  const int64_t half = H / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float *c = cos + r * H, *s = sin + r * H;
    for (int64_t n = 0; n < N; ++n) {
      const float* xi = x + (r * N + n) * H;
      float* yi = y + (r * N + n) * H;
      if (inverse) {
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float lo = xi[j], hi = xi[j + half];
          yi[j] = lo * c[j] + hi * s[j + half];
          yi[j + half] = hi * c[j + half] - lo * s[j];
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float lo = xi[j], hi = xi[j + half];
          yi[j] = lo * c[j] - hi * s[j];
          yi[j + half] = hi * c[j + half] + lo * s[j + half];
        }
      }
    }
  }
}

ffi::Error Rope(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cos,
                ffi::Buffer<ffi::F32> sin, ffi::ResultBuffer<ffi::F32> y, int32_t inverse) {
  const auto dims = x.dimensions();
  if (dims.size() != 3 || dims[2] % 2) {
    return ffi::Error::InvalidArgument("ftlib_rope: x must be [rows, heads, even head_dim]");
  }
  const int64_t R = dims[0], N = dims[1], H = dims[2];
  const float *xp = x.typed_data(), *cp = cos.typed_data(), *sp = sin.typed_data();
  float* yp = y->typed_data();
  ftlib::ParallelForChunks(pool, R, kRowsPerUnit, [=](int64_t, int64_t lo, int64_t hi) {
    Rows(xp + lo * N * H, cp + lo * H, sp + lo * H, hi - lo, N, H, inverse != 0,
         yp + lo * N * H);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibRope, Rope,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("inverse"));
