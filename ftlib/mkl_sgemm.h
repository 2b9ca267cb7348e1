// MKL's cblas_sgemm for ftlib's C++ kernels that run products (mkl_gemm.cc,
// attention_kernel.cc): loaded at run time from the `mkl` wheel, not linked.
// Each kernel library is one translation unit and includes this once.
#ifndef FTLIB_MKL_SGEMM_H_
#define FTLIB_MKL_SGEMM_H_

#include <dlfcn.h>

namespace ftlib {

using SgemmFn = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float* a, int lda, const float* b, int ldb, float beta, float* c,
                         int ldc);
static SgemmFn cblas_sgemm = nullptr;  // one per kernel library (each is one translation unit)

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

}  // namespace ftlib

// Loads MKL's single dynamic library privately (RTLD_DEEPBIND: a torch loaded in the
// same process exports its own cblas_sgemm, with OpenMP threads) in its sequential
// layer: the kernels run it on XLA's pool. Returns 0, or -1 with nothing loaded.
extern "C" int FtlibMklInit(const char* mkl_rt_path) {
  void* lib = dlopen(mkl_rt_path, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (lib == nullptr) return -1;
  auto set_layer = reinterpret_cast<int (*)(int)>(dlsym(lib, "MKL_Set_Threading_Layer"));
  auto sgemm = reinterpret_cast<ftlib::SgemmFn>(dlsym(lib, "cblas_sgemm"));
  if (set_layer == nullptr || sgemm == nullptr) return -1;
  constexpr int kSequential = 1;  // MKL_THREADING_SEQUENTIAL
  set_layer(kSequential);
  ftlib::cblas_sgemm = sgemm;
  return 0;
}

#endif  // FTLIB_MKL_SGEMM_H_
