// The blocked attention's softmax over one query block's scores, one pass per row while
// the row is in cache, as an XLA FFI custom call. Built and registered by
// ftlib/masked_softmax.py; rows are split across XLA's intra-op pool.
//
// Why: XLA:CPU runs the bias add, max, exp, sum and scaling as a YNNPACK elementwise
// fusion at ~1.5 ns per score on this project's Xeon (llama-small: ~65 ms of the
// forward, benchmarks/README.md); rows of 128-512 scores fit in L1.
//
//   ftlib_masked_softmax: s [B, K, R, S] f32, bias [B, R, S] f32 (0 where a key is
//     visible, a large negative number where not; shared by the K heads) ->
//     p [B, K, R, S] f32 (aliased to s by the caller): softmax over S of s + bias.

#include <cmath>
#include <cstdint>

#include "cpu_math.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One row, in place: x <- softmax(x + bias).
FTLIB_VECTOR_CLONES void Row(float* __restrict x, const float* __restrict bias, int64_t S) {
  float max = -INFINITY;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < S; ++j) {
    x[j] += bias[j];
    max = x[j] > max ? x[j] : max;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < S; ++j) {
    x[j] = ftlib::ExpNonPositive(x[j] - max);
    sum += x[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < S; ++j) x[j] /= sum;
}

constexpr int64_t kRowsPerUnit = 16;

ffi::Error MaskedSoftmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> s,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> p) {
  auto dims = s.dimensions();
  auto bias_dims = bias.dimensions();
  if (dims.size() != 4 || bias_dims.size() != 3 || bias_dims[0] != dims[0] ||
      bias_dims[1] != dims[2] || bias_dims[2] != dims[3]) {
    return ffi::Error::InvalidArgument("ftlib_masked_softmax: s [B, K, R, S], bias [B, R, S]");
  }
  if (p->typed_data() != s.typed_data()) {
    return ffi::Error::InvalidArgument("ftlib_masked_softmax: p must alias s");
  }
  const int64_t K = dims[1], R = dims[2], S = dims[3];
  float* x = p->typed_data();
  const float* b = bias.typed_data();
  // Row m of s is (batch m / (K R), head, query m % R); its bias row is batch * R + query.
  ftlib::ParallelForChunks(pool, dims[0] * K * R, kRowsPerUnit,
                           [=](int64_t, int64_t lo, int64_t hi) {
                             for (int64_t m = lo; m < hi; ++m) {
                               const int64_t bias_row = m / (K * R) * R + m % R;
                               Row(x + m * S, b + bias_row * S, S);
                             }
                           });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibMaskedSoftmax, MaskedSoftmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
