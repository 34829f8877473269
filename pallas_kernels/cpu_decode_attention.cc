// Paged attention for tokens that each read their own sequence's pages (decode batches), in
// float32 on an x86 CPU with AVX-512: out [T, H, D] from q [T, H, D] and the KV pool
// k_pages, v_pages [L, N, page_size, KVH, D], layer `layer`, each token's page table row
// tables [T, P] and position pos [T] (it attends keys 0..pos; pos < 0: padding, zeros out).
//
// XLA's CPU backend runs this as gathers of whole pages into blocks, then multiply-reduce
// fusions at 10-20 GFLOP/s: on the demo's B=16 step about 19 ms for 3.6 MB of K and V a
// layer. Here each (token, KV head) pair reads its keys where they lie in the pool, one
// 64-byte-aligned row of D floats a key: the scores of the G query heads that share the
// head, an exact softmax (the maximum first, then exp and the sum), and the values weighted
// by it. The pairs are shared by the threads of XLA's intra-op pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxHeadDim = 256;  // D / 16 registers a row
constexpr int64_t kMaxGroup = 16;     // query heads per KV head

// e^x for x <= 0 (scores less their maximum), float32 to about 1 ulp: 2^n e^r with
// n = round(x / ln 2), r = x - n ln 2 (in two parts) and e^r by its Taylor series to r^7.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // below: e^x is under float32's normals
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Keys ahead whose rows are prefetched: a key's row is a few lines apart from the next
// key's, and the pages lie anywhere in the pool, so the hardware cannot guess them. On the
// demo's B=16 step: 2 keys ahead (one line each) 6.5 ms of attention, 8 keys 5.2, 16 keys
// 4.5-4.9, 32 keys 4.8.
constexpr int64_t kAhead = 16;

inline void Prefetch(const float* row, int64_t dim) {
  for (int64_t c = 0; c < dim; c += kLanes)  // one 64-byte line per 16 floats
    _mm_prefetch(reinterpret_cast<const char*>(row + c), _MM_HINT_T0);
}

struct Shapes {
  int64_t tokens, heads, dim, kv_heads, group, page_size, pages_per_seq, pool_pages;
};

// One (token, KV head) pair: its G query heads' rows of out.
void Pair(const Shapes& s, const float* q, const float* k, const float* v, const int32_t* tables,
          const int32_t* pos, float scale, int64_t token, int64_t kvh, float* out,
          std::vector<float>& scores, std::atomic<bool>& bad) {
  const int64_t g_count = s.group, d_regs = s.dim / kLanes;
  const int64_t keys = std::min<int64_t>(pos[token] + 1, s.pages_per_seq * s.page_size);
  float* o = out + (token * s.heads + kvh * g_count) * s.dim;
  if (keys <= 0) {
    std::fill(o, o + g_count * s.dim, 0.0f);
    return;
  }
  const int32_t* table = tables + token * s.pages_per_seq;
  for (int64_t p = 0; p < (keys + s.page_size - 1) / s.page_size; ++p)
    if (table[p] < 0 || table[p] >= s.pool_pages) {  // never read outside the pool
      bad = true;
      std::fill(o, o + g_count * s.dim, NAN);
      return;
    }
  const int64_t row_stride = s.kv_heads * s.dim;  // floats from one key's row to the next's
  auto row = [&](const float* pages, int64_t j) {
    const int64_t page = table[j / s.page_size];
    return pages + ((page * s.page_size + j % s.page_size) * row_stride + kvh * s.dim);
  };
  scores.resize(g_count * keys);
  // Scores: q . k for each query head of the group, scaled.
  __m512 qv[kMaxGroup][kMaxHeadDim / kLanes];
  for (int64_t g = 0; g < g_count; ++g)
    for (int64_t c = 0; c < d_regs; ++c)
      qv[g][c] = _mm512_mul_ps(
          _mm512_loadu_ps(q + (token * s.heads + kvh * g_count + g) * s.dim + c * kLanes),
          _mm512_set1_ps(scale));
  for (int64_t j = 0; j < keys; ++j) {
    const float* kr = row(k, j);
    if (j + kAhead < keys) Prefetch(row(k, j + kAhead), s.dim);
    for (int64_t g = 0; g < g_count; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(kr));
      for (int64_t c = 1; c < d_regs; ++c)
        acc = _mm512_fmadd_ps(qv[g][c], _mm512_loadu_ps(kr + c * kLanes), acc);
      scores[g * keys + j] = _mm512_reduce_add_ps(acc);
    }
  }
  // Softmax weights, unnormalised, and their sums.
  float sums[kMaxGroup];
  for (int64_t g = 0; g < g_count; ++g) {
    float* sg = scores.data() + g * keys;
    const float top = *std::max_element(sg, sg + keys);
    __m512 total = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + kLanes <= keys; j += kLanes) {
      const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(sg + j), _mm512_set1_ps(top)));
      _mm512_storeu_ps(sg + j, e);
      total = _mm512_add_ps(total, e);
    }
    if (j < keys) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (keys - j)) - 1);
      const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + j), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(sg + j, tail, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    }
    sums[g] = _mm512_reduce_add_ps(total);
  }
  // Values weighted by the softmax.
  __m512 acc[kMaxGroup][kMaxHeadDim / kLanes];
  for (int64_t g = 0; g < g_count; ++g)
    for (int64_t c = 0; c < d_regs; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < keys; ++j) {
    const float* vr = row(v, j);
    if (j + kAhead < keys) Prefetch(row(v, j + kAhead), s.dim);
    for (int64_t g = 0; g < g_count; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * keys + j]);
      for (int64_t c = 0; c < d_regs; ++c)
        acc[g][c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + c * kLanes), acc[g][c]);
    }
  }
  for (int64_t g = 0; g < g_count; ++g) {
    const __m512 inv = _mm512_set1_ps(1.0f / sums[g]);
    for (int64_t c = 0; c < d_regs; ++c)
      _mm512_storeu_ps(o + g * s.dim + c * kLanes, _mm512_mul_ps(acc[g][c], inv));
  }
}

// One call's work: its (token, KV head) pairs, shared by the threads (cpu_pool.h).
struct Work : jaxserve::SharedItems {
  using Scratch = std::vector<float>;  // a thread's scores, reused from pair to pair
  Shapes s;
  const float *q, *k, *v;
  const int32_t *tables, *pos;
  float scale;
  float* out;
  std::atomic<bool> bad{false};  // a page table entry outside the pool

  void Item(int64_t i, Scratch& scores) {
    Pair(s, q, k, v, tables, pos, scale, i / s.kv_heads, i % s.kv_heads, out, scores, bad);
  }
};

ffi::Error CpuDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k_pages, ffi::Buffer<ffi::F32> v_pages,
                              ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> tables,
                              ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out,
                              float sm_scale) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || td.size() != 2 || td[0] != qd[0] ||
      pos.dimensions().size() != 1 || pos.dimensions()[0] != qd[0] || kd[4] != qd[2] ||
      !std::equal(kd.begin(), kd.end(), v_pages.dimensions().begin(),
                  v_pages.dimensions().end()) ||
      qd[1] % kd[3] != 0 || qd[2] % kLanes != 0 ||
      qd[2] > kMaxHeadDim || qd[1] / kd[3] > kMaxGroup)
    return ffi::Error::InvalidArgument("cpu_decode_attention: shapes do not fit");
  auto work = std::make_shared<Work>();
  Shapes& s = work->s;
  s.tokens = qd[0];
  s.heads = qd[1];
  s.dim = qd[2];
  s.kv_heads = kd[3];
  s.group = s.heads / s.kv_heads;
  s.page_size = kd[2];
  s.pages_per_seq = td[1];
  s.pool_pages = kd[1];
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("cpu_decode_attention: layer");
  const int64_t layer_floats = s.pool_pages * s.page_size * s.kv_heads * s.dim;
  work->q = q.typed_data();
  work->k = k_pages.typed_data() + l * layer_floats;
  work->v = v_pages.typed_data() + l * layer_floats;
  work->tables = tables.typed_data();
  work->pos = pos.typed_data();
  work->scale = sm_scale;
  work->out = out->typed_data();
  jaxserve::RunShared(pool, work, s.tokens * s.kv_heads);
  if (work->bad) return ffi::Error::InvalidArgument("cpu_decode_attention: a page outside the pool");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_cpu_decode_attention, CpuDecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale"));
