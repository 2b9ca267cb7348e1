// Work split across XLA:CPU's intra-op pool from inside an FFI kernel, shared by
// ftlib's C++ kernels (the .cc files beside it).
#ifndef FTLIB_CPU_POOL_H_
#define FTLIB_CPU_POOL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ftlib {

// Runs fn(unit) for every unit in [0, count) on the pool's threads and the calling one.
// Each thread claims units until none is left, so the call never waits on a task that
// has not started: a busy pool cannot deadlock it, only leave the caller more work.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, Fn fn) {
  struct Units {
    Units(Fn f, int64_t n) : fn(std::move(f)), count(n) {}
    Fn fn;
    int64_t count;
    std::atomic<int64_t> next{0}, done{0};
    void Drain() {
      for (int64_t u; (u = next.fetch_add(1)) < count;) {
        fn(u);
        done.fetch_add(1);
      }
    }
  };
  auto units = std::make_shared<Units>(std::move(fn), count);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([units] { units->Drain(); });
  units->Drain();
  while (units->done.load() < units->count) std::this_thread::yield();
}

// Runs fn(unit, lo, hi) for [0, n) cut into units of `chunk` items (the last may be
// shorter), as ParallelFor does.
template <typename Fn>
void ParallelForChunks(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunk, Fn fn) {
  ParallelFor(pool, (n + chunk - 1) / chunk, [=](int64_t unit) {
    int64_t lo = unit * chunk;
    fn(unit, lo, std::min(lo + chunk, n));
  });
}

// Sums over [0, n) cut into units of `chunk` items, run as ParallelForChunks does:
// fn(lo, hi, partial) adds its unit's `width` results into partial (zeroed), and
// out[0, width) gets the units' partials added in unit order, so the sum is the same on
// every run whichever thread ran which unit.
template <typename Fn>
void SumOverChunks(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunk, int64_t width,
                   float* out, Fn fn) {
  const int64_t units = (n + chunk - 1) / chunk;
  std::vector<float> partials(units * width, 0.0f);
  float* part = partials.data();
  ParallelForChunks(pool, n, chunk, [=](int64_t u, int64_t lo, int64_t hi) {
    fn(lo, hi, part + u * width);
  });
  std::fill(out, out + width, 0.0f);
  for (int64_t u = 0; u < units; ++u) {
    for (int64_t j = 0; j < width; ++j) out[j] += part[u * width + j];
  }
}

}  // namespace ftlib

#endif  // FTLIB_CPU_POOL_H_
