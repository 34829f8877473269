// The CPU kernels' items of one call, shared by the calling thread and XLA's intra-op pool.
//
// The caller never waits for a pool thread to start (the pool may be busy, or its threads
// inside calls like this one): it takes every item left, then waits only for the items
// others took. A task that starts late finds none; the work outlives the call while a task
// holds it.
#ifndef JAXSERVE_PALLAS_KERNELS_CPU_POOL_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_POOL_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// What a kernel's work derives from: the counters of the items taken and done.
struct SharedItems {
  std::atomic<int64_t> next{0}, done{0};
};

// Runs work->Item(i, scratch) for i in [0, items), each once, on the calling thread and up to
// the pool's other threads; `Work::Scratch` is made once by each thread that takes items.
template <typename Work>
void RunShared(xla::ffi::ThreadPool& pool, const std::shared_ptr<Work>& work, int64_t items) {
  auto take = [work, items] {
    typename Work::Scratch scratch;
    for (int64_t i; (i = work->next.fetch_add(1)) < items;) {
      work->Item(i, scratch);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, items); ++t) {
    auto task = take;  // Schedule takes its task by value
    pool.Schedule(std::move(task));
  }
  take();
  while (work->done.load(std::memory_order_acquire) < items) _mm_pause();
}

}  // namespace jaxserve

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_POOL_H_
