// The blocked causal attention (ftlib/models/attention.py) as two XLA FFI custom calls
// that read q, k, v and write the output and the gradients in the projections' own
// [B, T, heads, H] layout, with MKL's products on sub-blocks addressed in place. Built
// and registered by ftlib/attention_kernel.py; work units run on XLA's intra-op pool.
//
// Why: as XLA ops, the blocked attention transposes q, k, v and the output to
// [B, heads, T, H] and back, copies each query block and key prefix out for the
// products, and concatenates and scatters the blocks' results (in the backward too):
// ~10% of a llama-small LoRA step in layout copies (benchmarks/README.md).
//
//   ftlib_causal_attention_fwd: q [B, T, N, H], k and v [B, T, K, H] f32, mask [B, T, T]
//     pred (query t may see key s; nothing above the diagonal), attr `blocks` ->
//     out [B, T, N, H] f32, probs [B, N, P] f32.
//   ftlib_causal_attention_bwd: q, k, v, probs, dout [B, T, N, H] ->
//     dq [B, T, N, H], dk and dv [B, T, K, H] f32. The softmax's backward takes
//     sum_s p dp per row (equal to dout . out), so the output is not a residual: o_proj
//     saves it already, and under the layer scan each residual is one more stack.
// Query head n reads key/value head n / (N / K) (grouped-query attention). T is cut into
// `blocks` query blocks of R = T / blocks rows; block i meets keys [0, (i + 1) R) only,
// and its probabilities [R, (i + 1) R] sit at offset R^2 i (i + 1) / 2 of a head's P =
// R^2 blocks (blocks + 1) / 2. Scores are scaled by 1 / sqrt(H). A row with no visible
// key gets uniform probabilities, as the XLA path's finite -1e30 bias gives.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_math.h"
#include "cpu_pool.h"
#include "mkl_sgemm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ftlib::cblas_sgemm, ftlib::kNoTrans, ftlib::kRowMajor, ftlib::kTrans;

struct Shape {
  int64_t B, T, N, K, H, blocks;
  int64_t G() const { return N / K; }
  int64_t R() const { return blocks > 0 ? T / blocks : 0; }
  int64_t P() const { return R() * R() * blocks * (blocks + 1) / 2; }
  // Row t of query head n (or key/value head n) of batch b, and the rows' stride.
  int64_t QRow(int64_t b, int64_t t, int64_t n) const { return ((b * T + t) * N + n) * H; }
  int64_t KRow(int64_t b, int64_t t, int64_t n) const { return ((b * T + t) * K + n) * H; }
  int64_t BlockProbs(int64_t b, int64_t n, int64_t i) const {
    return (b * N + n) * P() + R() * R() * i * (i + 1) / 2;
  }
};

// One row of scores, in place: softmax over the visible keys, 0 elsewhere. The mask is
// read as bytes and the hidden scores set to -inf first: selects on a bool array kept
// GCC's loops scalar (6 ns a score against 1).
FTLIB_VECTOR_CLONES void SoftmaxRow(float* __restrict x, const uint8_t* __restrict visible,
                                    int64_t S) {
  float max = -INFINITY;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < S; ++j) {
    const float xj = visible[j] ? x[j] : -INFINITY;
    x[j] = xj;
    max = xj > max ? xj : max;
  }
  if (max == -INFINITY) {  // no visible key
    for (int64_t j = 0; j < S; ++j) x[j] = 1.0f / S;
    return;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < S; ++j) {
    const float e = ftlib::ExpNonPositive(x[j] - max);
    x[j] = x[j] == -INFINITY ? 0.0f : e;
    sum += x[j];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < S; ++j) x[j] *= inv;
}

// dS = P * (dP - delta) in place over dP, delta = sum_s p dp of the row.
FTLIB_VECTOR_CLONES void SoftmaxGradRow(float* __restrict dp, const float* __restrict p,
                                        float delta, int64_t S) {
#pragma omp simd
  for (int64_t j = 0; j < S; ++j) dp[j] = p[j] * (dp[j] - delta);
}

FTLIB_VECTOR_CLONES float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// q [B, T, N, H], k and v [B, T, K, H] with K dividing N, `blocks` dividing T, and
// `other` (the mask, [B, T, T]; or probs, [B, N, P]) as given.
ffi::Error CheckShapes(const Shape& s, ffi::Span<const int64_t> k_dims,
                       ffi::Span<const int64_t> v_dims, ffi::Span<const int64_t> other,
                       std::vector<int64_t> other_expected) {
  const std::vector<int64_t> kv = {s.B, s.T, s.K, s.H};
  auto is = [](ffi::Span<const int64_t> dims, const std::vector<int64_t>& want) {
    return std::equal(dims.begin(), dims.end(), want.begin(), want.end());
  };
  if (s.K <= 0 || s.N % s.K || s.blocks <= 0 || s.T % s.blocks || !is(k_dims, kv) ||
      !is(v_dims, kv) || !is(other, other_expected)) {
    return ffi::Error::InvalidArgument(
        "ftlib_causal_attention: q [B, T, N, H], k and v [B, T, K, H] (K dividing N), "
        "`blocks` dividing T, mask [B, T, T], probs [B, N, P]");
  }
  return ffi::Error::Success();
}

// K = 0 (refused by CheckShapes) unless q and k have four dimensions.
Shape ShapeOf(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k, int64_t blocks) {
  if (q.size() != 4 || k.size() != 4) return Shape{0, 0, 0, 0, 0, blocks};
  return Shape{q[0], q[1], q[2], k[2], q[3], blocks};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs,
                   int64_t blocks) {
  const Shape s = ShapeOf(q.dimensions(), k.dimensions(), blocks);
  auto error = CheckShapes(s, k.dimensions(), v.dimensions(), mask.dimensions(), {s.B, s.T, s.T});
  if (error.failure()) return error;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const auto* mp = reinterpret_cast<const uint8_t*>(mask.typed_data());  // bools: 0 or 1
  float *op = out->typed_data(), *pp = probs->typed_data();
  const int64_t R = s.R(), ldq = s.N * s.H, ldk = s.K * s.H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.H));
  // Unit (b, n, block), the longest blocks (the last rows) first, so that the pool's
  // threads end together.
  ftlib::ParallelFor(pool, s.B * s.N * blocks, [=](int64_t u) {
    const int64_t i = blocks - 1 - u / (s.B * s.N), n = u % s.N, b = u / s.N % s.B;
    const int64_t t0 = i * R, end = t0 + R, kv = n / s.G();
    float* p = pp + s.BlockProbs(b, n, i);
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, R, end, s.H, scale, qp + s.QRow(b, t0, n), ldq,
                kp + s.KRow(b, 0, kv), ldk, 0.0f, p, end);
    for (int64_t r = 0; r < R; ++r) SoftmaxRow(p + r * end, mp + (b * s.T + t0 + r) * s.T, end);
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, R, s.H, end, 1.0f, p, end, vp + s.KRow(b, 0, kv),
                ldk, 0.0f, op + s.QRow(b, t0, n), ldq);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> probs,
                    ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, int64_t blocks) {
  const Shape s = ShapeOf(q.dimensions(), k.dimensions(), blocks);
  auto error =
      CheckShapes(s, k.dimensions(), v.dimensions(), probs.dimensions(), {s.B, s.N, s.P()});
  if (error.failure()) return error;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *pp = probs.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const int64_t R = s.R(), ldq = s.N * s.H, ldk = s.K * s.H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.H));
  // Unit (b, key/value head): it alone writes that head's dk and dv, summed over its
  // query heads and blocks in a fixed order (the same result on every run).
  ftlib::ParallelFor(pool, s.B * s.K, [=](int64_t u) {
    const int64_t b = u / s.K, kv = u % s.K;
    float *dk0 = dkp + s.KRow(b, 0, kv), *dv0 = dvp + s.KRow(b, 0, kv);
    for (int64_t t = 0; t < s.T; ++t) {
      std::fill(dk0 + t * ldk, dk0 + t * ldk + s.H, 0.0f);
      std::fill(dv0 + t * ldk, dv0 + t * ldk + s.H, 0.0f);
    }
    std::vector<float> ds(R * s.T);
    for (int64_t n = kv * s.G(); n < (kv + 1) * s.G(); ++n) {
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t t0 = i * R, end = t0 + R;
        const float* p = pp + s.BlockProbs(b, n, i);
        const float *q0 = qp + s.QRow(b, t0, n), *do0 = dop + s.QRow(b, t0, n);
        // dV[:end] += P^T dO; dP = dO V[:end]^T, then dS over it.
        cblas_sgemm(kRowMajor, kTrans, kNoTrans, end, s.H, R, 1.0f, p, end, do0, ldq, 1.0f, dv0,
                    ldk);
        cblas_sgemm(kRowMajor, kNoTrans, kTrans, R, end, s.H, 1.0f, do0, ldq,
                    vp + s.KRow(b, 0, kv), ldk, 0.0f, ds.data(), end);
        for (int64_t r = 0; r < R; ++r) {  // delta = sum_s p dp = dout . out, out not kept
          float* ds_r = ds.data() + r * end;
          SoftmaxGradRow(ds_r, p + r * end, Dot(ds_r, p + r * end, end), end);
        }
        // dQ = scale dS K[:end]; dK[:end] += scale dS^T Q.
        cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, R, s.H, end, scale, ds.data(), end,
                    kp + s.KRow(b, 0, kv), ldk, 0.0f, dqp + s.QRow(b, t0, n), ldq);
        cblas_sgemm(kRowMajor, kTrans, kNoTrans, end, s.H, R, scale, ds.data(), end, q0, ldq,
                    1.0f, dk0, ldk);
      }
    }
  });
  return ffi::Error::Success();
}

// The pool and q, k, v: both targets' first buffers.
auto BindQkv() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibCausalAttentionFwd, Forward,
                              BindQkv()
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // probs
                                  .Attr<int64_t>("blocks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibCausalAttentionBwd, Backward,
                              BindQkv()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // probs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<int64_t>("blocks"));
