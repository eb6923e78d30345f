// Shared helpers for the CPU-native kernels: work splitting over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace tokenlab {

// Runs body(i) for every i in [0, n), spread over the caller and XLA's intra-op pool.
//
// The caller always takes part and claims items from a shared counter; pool tasks claim from the same
// counter. When the counter runs out the caller closes the loop and waits only for tasks that already
// started, so a task the pool runs late (or never, when every pool thread is busy — e.g. the handler
// itself runs on a pool thread) cannot deadlock the call: it finds the loop closed and returns.
template <class F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, F&& body) {
  if (n <= 0) return;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
    std::atomic<bool> closed{false};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto* fn = &body;
  auto drain = [st, fn, n]() {
    for (int64_t i = st->next.fetch_add(1); i < n; i = st->next.fetch_add(1)) (*fn)(i);
  };
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([st, drain]() {
      st->active.fetch_add(1);
      if (!st->closed.load()) drain();
      std::lock_guard<std::mutex> lock(st->mu);
      st->active.fetch_sub(1);
      st->cv.notify_all();
    });
  }
  drain();
  st->closed.store(true);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->active.load() == 0; });
}

}  // namespace tokenlab
