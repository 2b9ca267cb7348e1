// AdamW's whole update of one parameter in one pass, as an XLA FFI custom call. Built
// and registered by ftlib/fused_adamw.py; the elements are split across XLA's intra-op
// pool.
//
// Why: XLA:CPU runs optax's clip + adamw + apply_updates as separate passes: the first
// moment, the second moment, the parameter (reading both moments back), g^2 written out
// for the gradient norm and a reduction over it. That is about 13 passes over
// parameter-sized arrays where 7 suffice (read p, g, m, v; write p, m, v), at memory
// speed (benchmarks/README.md has the timings).
//
//   ftlib_adamw: p, g, m, v [n], scalars [6] = (-lr, 1 / (1 - b1^t), 1 / (1 - b2^t),
//     gradient norm, 1 / gradient norm, clip norm) -> p', m', v' [n] (updated in place:
//     aliased to p, m, v), sum of g^2 [] (g before clipping; summed per unit, then in
//     unit order: the same result on every run).
//   ftlib_sum_squares: g [n] -> sum of g^2 [] (summed as above): with clipping, the
//     global norm has to come before the update, in one read of each gradient.
//   Per element, optax's operations as XLA:CPU compiles them (its divisions by a scalar
//   become products with the reciprocal). XLA also fuses some multiply-adds where this
//   kernel rounds every product, so the two paths agree to a few ulps, not bit for bit:
//     g <- (g * (1 / norm)) * clip       if clip > 0 and not norm < clip
//     m' = (1 - b1) g + b1 m;  v' = (1 - b2) g^2 + b2 v
//     u = (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps) [+ wd p]
//     p' = p + (-lr) u

#include <cmath>
#include <cstdint>

#include "cpu_math.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

// Every product and sum rounded on its own: no fused multiply-adds, so that the AVX-512,
// AVX2 and baseline builds give the same bits.
#pragma STDC FP_CONTRACT OFF             // clang
#pragma GCC optimize("fp-contract=off")  // GCC ignores the standard pragma in C++

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kElementsPerUnit = 1 << 14;  // 64 KB of each array per unit

struct Hyper {
  float neg_lr, inv_correction1, inv_correction2, norm, inv_norm, clip;
  float one_minus_b1, b1, one_minus_b2, b2, eps, weight_decay;
};

// Clipping and decay are template flags, not branches or selects in the loop: with
// either, GCC 12 keeps the loop scalar (4x slower). `h` goes by value and the arrays
// __restrict, so that a store to p cannot change h's fields or g for all it knows.
template <bool kClipped, bool kDecays>
FTLIB_VECTOR_CLONES float UpdateRange(const Hyper h, int64_t n, float* __restrict p,
                                      const float* __restrict g, float* __restrict m,
                                      float* __restrict v) {
  float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    float gi = g[i];
    sum_sq += gi * gi;
    if (kClipped) gi = (gi * h.inv_norm) * h.clip;
    const float mi = h.one_minus_b1 * gi + h.b1 * m[i];
    const float vi = h.one_minus_b2 * (gi * gi) + h.b2 * v[i];
    float u = (mi * h.inv_correction1) / (std::sqrt(vi * h.inv_correction2) + h.eps);
    if (kDecays) u = u + h.weight_decay * pi;
    p[i] = pi + h.neg_lr * u;
    m[i] = mi;
    v[i] = vi;
  }
  return sum_sq;
}

template <bool kClipped>
float UpdateRange(const Hyper& h, int64_t n, float* p, const float* g, float* m, float* v) {
  return h.weight_decay != 0.0f ? UpdateRange<kClipped, true>(h, n, p, g, m, v)
                                : UpdateRange<kClipped, false>(h, n, p, g, m, v);
}

FTLIB_VECTOR_CLONES float SumSquares(int64_t n, const float* __restrict g) {
  float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < n; ++i) sum_sq += g[i] * g[i];
  return sum_sq;
}

// fn(lo, hi) -> a float for each unit of [0, n), run over the pool; -> their sum, added
// in unit order so that it is the same on every run.
template <typename Fn>
float SumOverUnits(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  float total;
  ftlib::SumOverChunks(pool, n, kElementsPerUnit, 1, &total,
                       [=](int64_t lo, int64_t hi, float* part) { *part = fn(lo, hi); });
  return total;
}

ffi::Error AdamW(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g,
                 ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> scalars,
                 ffi::ResultBuffer<ffi::F32> p_out, ffi::ResultBuffer<ffi::F32> m_out,
                 ffi::ResultBuffer<ffi::F32> v_out, ffi::ResultBuffer<ffi::F32> sum_sq,
                 float one_minus_b1, float b1, float one_minus_b2, float b2, float eps,
                 float weight_decay) {
  const int64_t n = p.element_count();
  if (g.element_count() != n || m.element_count() != n || v.element_count() != n ||
      scalars.element_count() != 6) {
    return ffi::Error::InvalidArgument("ftlib_adamw: p, g, m, v differ in size or scalars not 6");
  }
  const float* s = scalars.typed_data();
  const Hyper h{s[0], s[1], s[2], s[3], s[4], s[5], one_minus_b1, b1, one_minus_b2, b2, eps,
                weight_decay};
  float *pp = p_out->typed_data(), *mp = m_out->typed_data(), *vp = v_out->typed_data();
  if (pp != p.typed_data() || mp != m.typed_data() || vp != v.typed_data()) {
    return ffi::Error::InvalidArgument("ftlib_adamw: p', m', v' must alias p, m, v");
  }
  const float* gp = g.typed_data();
  const bool clipped = h.clip > 0.0f && !(h.norm < h.clip);
  const float total = SumOverUnits(pool, n, [=](int64_t lo, int64_t hi) {
    return clipped ? UpdateRange<true>(h, hi - lo, pp + lo, gp + lo, mp + lo, vp + lo)
                   : UpdateRange<false>(h, hi - lo, pp + lo, gp + lo, mp + lo, vp + lo);
  });
  *sum_sq->typed_data() = total;
  return ffi::Error::Success();
}

ffi::Error SumOfSquares(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                        ffi::ResultBuffer<ffi::F32> sum_sq) {
  const float* gp = g.typed_data();
  auto range = [=](int64_t lo, int64_t hi) { return SumSquares(hi - lo, gp + lo); };
  *sum_sq->typed_data() = SumOverUnits(pool, g.element_count(), range);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSumSquares, SumOfSquares,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));
