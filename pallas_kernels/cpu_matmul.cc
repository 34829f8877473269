// y [M, N] = x [M, K] . w [N, K]^T in float32 on an x86 CPU with AVX-512, for M <= 16.
//
// A decode step multiplies a few rows of x by every weight. XLA's CPU GEMM runs such
// products at 100-130 GFLOP/s on 2 cores, neither at the memory's nor at the FMA units'
// limit. Here x is laid out transposed, xt [K, 16], so one 512-bit register holds the 16
// rows' values of one input k; a weight row's value w[n, k] is broadcast and multiplied into
// the register of output n. Each program walks R = 8 rows of w at once (8 accumulators, one
// register of x per k) and prefetches the next 8 rows, contiguous in memory, spread over
// the current ones, so the weight streams from memory while the FMAs run. The rows of w are
// shared by the threads of XLA's intra-op pool. Rows of x past M are zeros; their lanes are
// computed and dropped. Each output is one float32 sum over k in order.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // float32 lanes of a 512-bit register: the most rows of x
constexpr int64_t kRows = 8;    // rows of w a block multiplies at once
constexpr int64_t kChunksPerThread = 4;

void RowBlocks(const float* xt, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               int64_t n0, int64_t n1) {
  for (int64_t row = n0; row < n1; row += kRows) {
    const int64_t rows = std::min(kRows, n1 - row);
    const float* wr[kRows];
    for (int64_t r = 0; r < kRows; ++r) wr[r] = w + (row + std::min(r, rows - 1)) * k;
    // The next block's rows follow this block's in memory: one line every 16 / kRows inputs.
    const float* next = w + std::min(row + kRows, n1 - 1) * k;
    const int64_t ahead = std::max<int64_t>(0, std::min(kRows, n1 - row - kRows)) * k;
    __m512 acc[kRows];
    for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; ++i) {
      if ((i * kRows) % kLanes == 0 && i * kRows < ahead)
        _mm_prefetch(reinterpret_cast<const char*>(next + i * kRows), _MM_HINT_T0);
      const __m512 xv = _mm512_load_ps(xt + i * kLanes);
      for (int64_t r = 0; r < kRows; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(wr[r][i]), xv, acc[r]);
    }
    alignas(64) float out[kLanes];
    for (int64_t r = 0; r < rows; ++r) {
      _mm512_store_ps(out, acc[r]);
      for (int64_t j = 0; j < m; ++j) y[j * n + row + r] = out[j];
    }
  }
}

// One call's work: chunks of whole row blocks, shared by the threads (cpu_pool.h).
struct Work : jaxserve::SharedItems {
  struct Scratch {};
  const float* w;
  float* y;
  float* xt;
  int64_t m, n, k, chunk_rows;
  ~Work() { std::free(xt); }

  void Item(int64_t c, Scratch&) {
    RowBlocks(xt, w, y, m, n, k, c * chunk_rows, std::min(n, (c + 1) * chunk_rows));
  }
};

ffi::Error CpuMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[0] > kLanes)
    return ffi::Error::InvalidArgument("cpu_matmul: x [M <= 16, K] and w [N, K] expected");
  auto work = std::make_shared<Work>();
  work->m = xd[0];
  work->k = xd[1];
  work->n = wd[0];
  const int64_t m = work->m, k = work->k, n = work->n;
  work->xt = static_cast<float*>(std::aligned_alloc(64, k * kLanes * sizeof(float)));
  if (work->xt == nullptr) return ffi::Error::Internal("cpu_matmul: out of memory");
  std::memset(work->xt, 0, k * kLanes * sizeof(float));
  const float* xp = x.typed_data();
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < k; ++i) work->xt[i * kLanes + j] = xp[j * k + i];
  work->w = w.typed_data();
  work->y = y->typed_data();
  // A few chunks per thread, so that a thread that starts late still gets a share.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t blocks = (n + kRows - 1) / kRows;
  const int64_t per_chunk = std::max<int64_t>(1, blocks / (threads * kChunksPerThread));
  work->chunk_rows = per_chunk * kRows;
  jaxserve::RunShared(pool, work, (n + work->chunk_rows - 1) / work->chunk_rows);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_cpu_matmul, CpuMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
