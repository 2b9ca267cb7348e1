// fp32 GEMMs for XLA:CPU as FFI custom calls into sequential MKL, one output slice (or
// share of the batch) per thread of XLA's intra-op pool. Built and registered by
// ftlib/mkl_gemm.py.
//
// Why: on a 2-vCPU Sapphire Rapids Xeon, sequential MKL reaches ~150 GFLOP/s on one
// core, and XLA's own fp32 products 130-200 on both (benchmarks/README.md). Running
// MKL on XLA's pool (not MKL's OpenMP team) keeps one set of threads on the cores.
//
//   ftlib_sgemm:     C[i] = op(A[i]) @ op(B[i])
//   ftlib_sgemm_acc: C[i] = C0[i] + op(A[i]) @ op(B[i]), C aliased to C0 by the caller
// for i < batch: A[i] is [M, K] ([K, M] when transpose_a), B[i] is [K, N] ([N, K] when
// transpose_b), row-major and dense. The `_layer` targets take B as a stack [L, ...] of
// such operands and an int32 `layer` after it, and read B[layer] in place: a layer's
// frozen weight under the layer loop or scan, which XLA would otherwise copy out of the
// stack for the call.

#include <algorithm>
#include <cstdint>
#include <utility>

#include "cpu_pool.h"
#include "mkl_sgemm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ftlib::cblas_sgemm, ftlib::kNoTrans, ftlib::kRowMajor, ftlib::kTrans;

struct Gemm {
  const float* a;
  const float* b;
  float* c;
  int64_t batch, m, n, k;  // `batch` products, each operand's matrices back to back
  bool transpose_a, transpose_b;
  float beta;

  // C[i][m0:m1, n0:n1]: a slice of rows (or columns) is a pointer offset; the leading
  // dimensions stay those of the whole matrices.
  void Run(int64_t i, int64_t m0, int64_t m1, int64_t n0, int64_t n1) const {
    const float* ai = a + i * m * k;
    const float* bi = b + i * k * n;
    const float* a0 = transpose_a ? ai + m0 : ai + m0 * k;
    const float* b0 = transpose_b ? bi + n0 * k : bi + n0;
    cblas_sgemm(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans,
                m1 - m0, n1 - n0, k, 1.0f, a0, transpose_a ? m : k, b0, transpose_b ? k : n,
                beta, c + i * m * n + m0 * n + n0, n);
  }
};

// The work cut into units: whole products when there are at least as many as threads,
// else each product's output cut along its longer side.
void RunOnPool(ffi::ThreadPool& pool, const Gemm& gemm) {
  int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  int64_t cut = gemm.batch >= threads ? 1 : (threads + gemm.batch - 1) / gemm.batch;
  int64_t per_product = std::max<int64_t>(std::min(cut, std::max(gemm.m, gemm.n)), 1);
  ftlib::ParallelFor(pool, gemm.batch * per_product, [gemm, per_product](int64_t u) {
    int64_t i = u / per_product, p = u % per_product;
    bool rows = gemm.m >= gemm.n;
    int64_t size = rows ? gemm.m : gemm.n;
    int64_t lo = size * p / per_product, hi = size * (p + 1) / per_product;
    if (rows) {
      gemm.Run(i, lo, hi, 0, gemm.n);
    } else {
      gemm.Run(i, 0, gemm.m, lo, hi);
    }
  });
}

ffi::Error Sgemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                 ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b, int64_t batch,
                 int64_t m, int64_t n, int64_t k) {
  RunOnPool(pool, Gemm{a.typed_data(), b.typed_data(), c->typed_data(), batch, m, n, k,
                       transpose_a, transpose_b, 0.0f});
  return ffi::Error::Success();
}

ffi::Error SgemmAcc(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> a,
                    ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c, bool transpose_a,
                    bool transpose_b, int64_t batch, int64_t m, int64_t n, int64_t k) {
  if (c0.typed_data() != c->typed_data()) {
    return ffi::Error::InvalidArgument("ftlib_sgemm_acc: the output must alias the addend");
  }
  RunOnPool(pool, Gemm{a.typed_data(), b.typed_data(), c->typed_data(), batch, m, n, k,
                       transpose_a, transpose_b, 1.0f});
  return ffi::Error::Success();
}

// B[layer] of a stack of k * n floats per layer (batch 1), or nullptr when out of range.
const float* LayerOf(ffi::Buffer<ffi::F32> stack, ffi::Buffer<ffi::S32> layer, int64_t batch,
                     int64_t n, int64_t k) {
  const int64_t layers = stack.dimensions().size() == 0 ? 0 : stack.dimensions()[0];
  const int64_t i = *layer.typed_data();
  if (batch != 1 || i < 0 || i >= layers || layers * k * n != int64_t(stack.element_count())) {
    return nullptr;
  }
  return stack.typed_data() + i * k * n;
}

ffi::Error SgemmLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> stack,
                      ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> c,
                      bool transpose_a, bool transpose_b, int64_t batch, int64_t m, int64_t n,
                      int64_t k) {
  const float* b = LayerOf(stack, layer, batch, n, k);
  if (!b) return ffi::Error::InvalidArgument("ftlib_sgemm_layer: layer out of range");
  RunOnPool(pool, Gemm{a.typed_data(), b, c->typed_data(), batch, m, n, k, transpose_a,
                       transpose_b, 0.0f});
  return ffi::Error::Success();
}

ffi::Error SgemmAccLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> a,
                         ffi::Buffer<ffi::F32> stack, ffi::Buffer<ffi::S32> layer,
                         ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b,
                         int64_t batch, int64_t m, int64_t n, int64_t k) {
  if (c0.typed_data() != c->typed_data()) {
    return ffi::Error::InvalidArgument("ftlib_sgemm_acc_layer: the output must alias the addend");
  }
  const float* b = LayerOf(stack, layer, batch, n, k);
  if (!b) return ffi::Error::InvalidArgument("ftlib_sgemm_acc_layer: layer out of range");
  RunOnPool(pool, Gemm{a.typed_data(), b, c->typed_data(), batch, m, n, k, transpose_a,
                       transpose_b, 1.0f});
  return ffi::Error::Success();
}

}  // namespace

// The attributes every target takes after its buffers.
template <typename Binding>
auto WithGemmAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<bool>("transpose_a")
      .template Attr<bool>("transpose_b")
      .template Attr<int64_t>("batch")
      .template Attr<int64_t>("m")
      .template Attr<int64_t>("n")
      .template Attr<int64_t>("k");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSgemm, Sgemm,
                              WithGemmAttrs(ffi::Ffi::Bind()
                                                .Ctx<ffi::ThreadPool>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSgemmAcc, SgemmAcc,
                              WithGemmAttrs(ffi::Ffi::Bind()
                                                .Ctx<ffi::ThreadPool>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSgemmLayer, SgemmLayer,
                              WithGemmAttrs(ffi::Ffi::Bind()
                                                .Ctx<ffi::ThreadPool>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::S32>>()
                                                .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtlibSgemmAccLayer, SgemmAccLayer,
                              WithGemmAttrs(ffi::Ffi::Bind()
                                                .Ctx<ffi::ThreadPool>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::F32>>()
                                                .Arg<ffi::Buffer<ffi::S32>>()
                                                .Ret<ffi::Buffer<ffi::F32>>()));
