// RMSNorm forward and backward, each one pass over its [N, D] rows, as XLA FFI custom
// calls. Built and registered by ftlib/rms_norm_kernel.py; rows are split across XLA's
// intra-op pool.
//
// Why: XLA:CPU runs the forward as a sum-of-squares reduction, an rsqrt and a scaling
// pass, and the backward as four or five passes (two row reductions, a column
// reduction for dscale, the gradient), each over the whole [tokens, hidden] slab at
// memory speed (benchmarks/README.md has the timings).
//
//   ftlib_rms_norm_fwd: x [N, D], scale [D] -> y = x * r * scale [N, D],
//     r = 1 / sqrt(mean(x^2) + eps) [N]
//   ftlib_rms_norm_bwd: x [N, D], r [N], scale [D], dy [N, D] ->
//     dx = r * (dn - n * mean(dn * n)) [N, D] with n = x * r, dn = dy * scale,
//     dscale = sum over rows of dy * n [D] (summed per unit, then in unit order:
//     the same result on every run)

#include <cmath>
#include <cstdint>

#include "cpu_math.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerUnit = 32;

FTLIB_VECTOR_CLONES void ForwardRows(
    const float* x, const float* scale, float eps, int64_t rows, int64_t D, float* y, float* r) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * D;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < D; ++j) ss += xi[j] * xi[j];
    float ri = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    float* yi = y + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) yi[j] = xi[j] * ri * scale[j];
    r[i] = ri;
  }
}

FTLIB_VECTOR_CLONES void BackwardRows(
    const float* x, const float* r, const float* scale, const float* dy, int64_t rows,
    int64_t D, float* dx, float* dscale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float *xi = x + i * D, *dyi = dy + i * D;
    const float ri = r[i];
    float dot = 0.0f;  // sum of dn * n over the row
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < D; ++j) dot += dyi[j] * scale[j] * xi[j] * ri;
    const float mean = dot / static_cast<float>(D);
    float* dxi = dx + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      float n = xi[j] * ri;
      dxi[j] = ri * (dyi[j] * scale[j] - n * mean);
      dscale[j] += dyi[j] * n;
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> r, float eps) {
  const int64_t D = scale.element_count(), N = D ? x.element_count() / D : 0;
  const float *xp = x.typed_data(), *sp = scale.typed_data();
  float *yp = y->typed_data(), *rp = r->typed_data();
  ftlib::ParallelForChunks(pool, N, kRowsPerUnit, [=](int64_t, int64_t lo, int64_t hi) {
    ForwardRows(xp + lo * D, sp, eps, hi - lo, D, yp + lo * D, rp + lo);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> r,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale) {
  const int64_t D = scale.element_count(), N = D ? x.element_count() / D : 0;
  const float *xp = x.typed_data(), *rp = r.typed_data(), *sp = scale.typed_data();
  const float* dyp = dy.typed_data();
  float* dxp = dx->typed_data();
  // dscale sums over rows: each unit's into its own partial, then added in unit order.
  ftlib::SumOverChunks(pool, N, kRowsPerUnit, D, dscale->typed_data(),
                       [=](int64_t lo, int64_t hi, float* part) {
                         BackwardRows(xp + lo * D, rp + lo, sp, dyp + lo * D, hi - lo, D,
                                      dxp + lo * D, part);
                       });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibRmsNormFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibRmsNormBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
