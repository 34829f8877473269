// y [M, N] = x [M, K] . w [N, K]^T in float32 on an x86 CPU with AVX-512, for M <= 16.
//
// A decode step multiplies a few rows of x by every weight. XLA's CPU GEMM runs such
// products at 100-130 GFLOP/s on 2 cores, neither at the memory's nor at the FMA units'
// limit, and its matrix-vector loop (one row) reads the weights at about 0.85x the rate this
// kernel does. Two forms, both streaming the weight while the FMAs run, the rows of w shared
// by the threads of XLA's intra-op pool:
// * up to kDotRows rows, dot products (RowDots): each weight vector of 16 inputs is loaded
//   once and multiplied into each row's accumulator, lanes added at the end;
// * more rows, the broadcast form (RowBlocks): x is laid out transposed, xt [K, 16], so one
//   512-bit register holds the 16 rows' values of one input k; a weight row's value w[n, k]
//   is broadcast and multiplied into the register of output n, 8 rows of w at once (8
//   accumulators, one register of x per k), the next 8 rows (contiguous in memory)
//   prefetched over the current ones. Rows of x past M are zeros; their lanes are computed
//   and dropped. Each output is one float32 sum over k in order.
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

// The dot form, for M <= kDotRows rows of x: each output y[j, n] = x[j, :] . w[n, :] is summed
// in 16 lanes over k, as w's row and x's row lie, and the lanes added at the end. Each weight
// vector loaded is multiplied into the M rows' accumulators, so the FMAs per weight byte
// grow with M (the broadcast form above computes 16 lanes whatever M is); 16 / M rows of w
// (8 for one row) are walked at once, each prefetched kAhead floats ahead in its own stream.
constexpr int64_t kDotRows = 4;
constexpr int64_t kAhead = 128;

template <int64_t M>
void RowDots(const float* x, const float* w, float* y, int64_t n, int64_t k, int64_t n0,
             int64_t n1) {
  constexpr int64_t R = M == 1 ? kRows : kLanes / M;  // rows of w at once
  const int64_t full = k - k % kLanes;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k % kLanes)) - 1);
  for (int64_t row = n0; row < n1; row += R) {
    const int64_t rows = std::min(R, n1 - row);
    const float* wr[R];
    for (int64_t r = 0; r < R; ++r) wr[r] = w + (row + std::min(r, rows - 1)) * k;
    __m512 acc[M][R];
    for (int64_t j = 0; j < M; ++j)
      for (int64_t r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i <= full; i += kLanes) {
      const __mmask16 lanes = i < full ? static_cast<__mmask16>(0xffff) : tail;
      if (lanes == 0) break;
      __m512 xv[M];
      for (int64_t j = 0; j < M; ++j) xv[j] = _mm512_maskz_loadu_ps(lanes, x + j * k + i);
      for (int64_t r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[r] + i + kAhead), _MM_HINT_T0);
        const __m512 wv = _mm512_maskz_loadu_ps(lanes, wr[r] + i);
        for (int64_t j = 0; j < M; ++j) acc[j][r] = _mm512_fmadd_ps(wv, xv[j], acc[j][r]);
      }
    }
    for (int64_t j = 0; j < M; ++j)
      for (int64_t r = 0; r < rows; ++r) y[j * n + row + r] = _mm512_reduce_add_ps(acc[j][r]);
  }
}

// One call's work: chunks of whole row blocks, shared by the threads (cpu_pool.h).
struct Work : jaxserve::SharedItems {
  struct Scratch {};
  const float* x;
  const float* w;
  float* y;
  float* xt;  // x transposed, for the broadcast form (more than kDotRows rows)
  int64_t m, n, k, chunk_rows;
  ~Work() { std::free(xt); }

  void Item(int64_t c, Scratch&) {
    const int64_t n0 = c * chunk_rows, n1 = std::min(n, (c + 1) * chunk_rows);
    switch (m) {
      case 1: return RowDots<1>(x, w, y, n, k, n0, n1);
      case 2: return RowDots<2>(x, w, y, n, k, n0, n1);
      case 3: return RowDots<3>(x, w, y, n, k, n0, n1);
      case 4: return RowDots<4>(x, w, y, n, k, n0, n1);
      default: return RowBlocks(xt, w, y, m, n, k, n0, n1);
    }
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
  const float* xp = x.typed_data();
  work->x = xp;
  work->xt = nullptr;
  if (m > kDotRows) {
    work->xt = static_cast<float*>(std::aligned_alloc(64, k * kLanes * sizeof(float)));
    if (work->xt == nullptr) return ffi::Error::Internal("cpu_matmul: out of memory");
    std::memset(work->xt, 0, k * kLanes * sizeof(float));
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < k; ++i) work->xt[i * kLanes + j] = xp[j * k + i];
  }
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
