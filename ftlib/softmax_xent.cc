// The LM head's softmax cross-entropy over a block of logits rows, one pass per row
// while the row is in cache, as an XLA FFI custom call. Built and registered by
// ftlib/softmax_xent.py; rows are split across XLA's intra-op pool.
//
// Why: XLA:CPU runs the block's max, exp, sum, first-maximum key, min and gradient as
// six passes over the [rows, V] slab, each at memory speed (llama-tiny: 28 ms of a
// ~480 ms step, benchmarks/README.md). Here each row (32-128 KB) is read from memory
// once and written once; the other passes hit L1/L2.
//
//   ftlib_softmax_xent: logits [N, V] f32, targets [N] s32, weights [N] f32 ->
//     g [N, V] f32 (aliased to logits by the caller): w * (softmax - onehot(target)),
//       or the logits untouched when `gradient` is false,
//     nll [N] f32: w * (logsumexp - logit[target]),
//     correct [N] f32: w * [the first maximum's index == target] (argmax's ties).

#include <cmath>
#include <cstdint>

#include "cpu_math.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One row; x and g may be the same memory (every read of x[j] precedes the write).
FTLIB_VECTOR_CLONES void Row(
    const float* x, int64_t V, int32_t target, float weight, bool gradient, float* g,
    float* nll, float* correct) {
  float max = -INFINITY;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < V; ++j) max = x[j] > max ? x[j] : max;
  int64_t first = V;
  for (int64_t j = 0; j < V; ++j) {
    if (x[j] == max) {
      first = j;
      break;
    }
  }
  float gold = x[target];
  float sum = 0.0f;
  if (gradient) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) {
      float e = ftlib::ExpNonPositive(x[j] - max);
      g[j] = e;
      sum += e;
    }
    float scale = weight / sum;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) g[j] *= scale;
    g[target] -= weight;
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) sum += ftlib::ExpNonPositive(x[j] - max);
  }
  *nll = (max + std::log(sum) - gold) * weight;
  *correct = first == target ? weight : 0.0f;
}

constexpr int64_t kRowsPerUnit = 8;

ffi::Error SoftmaxXent(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                       ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                       ffi::ResultBuffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> nll,
                       ffi::ResultBuffer<ffi::F32> correct, bool gradient) {
  auto dims = logits.dimensions();
  if (dims.size() != 2 || targets.element_count() != dims[0]) {
    return ffi::Error::InvalidArgument("ftlib_softmax_xent: logits [N, V], targets [N]");
  }
  if (g->typed_data() != logits.typed_data()) {
    return ffi::Error::InvalidArgument("ftlib_softmax_xent: g must alias the logits");
  }
  const int64_t N = dims[0], V = dims[1];
  const int32_t* t = targets.typed_data();
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] < 0 || t[i] >= V) {
      return ffi::Error::InvalidArgument("ftlib_softmax_xent: a target is outside [0, V)");
    }
  }
  float* x = g->typed_data();
  const float* w = weights.typed_data();
  float* out_nll = nll->typed_data();
  float* out_correct = correct->typed_data();
  ftlib::ParallelForChunks(pool, N, kRowsPerUnit, [=](int64_t, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      Row(x + i * V, V, t[i], w[i], gradient, x + i * V, out_nll + i, out_correct + i);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSoftmaxXent, SoftmaxXent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("gradient"));
