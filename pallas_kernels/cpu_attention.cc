// Ragged paged attention for XLA:CPU, called through the XLA FFI (pallas_kernels/cpu_attention.py builds and
// registers it). Same semantics as ragged_paged_attention_reference: the new tokens of request b are
// q[cu_q_lens[b]:cu_q_lens[b+1]], they sit at the last positions of its kv_lens[b] tokens, and each sees the
// positions up to its own through the request's page table.
//
// Why a kernel of our own: in plain jnp every block of pages is first gathered into a new array and then read
// again by the products, and XLA:CPU either copies the gather (twice the memory traffic) or fuses it element by
// element. Here each page of K and V is read once, in place, and used at once for all the query heads of its
// KV head and all the tokens of a work unit.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Tokens of one request that share a pass over its pages: each K/V page is read once for all of them.
constexpr int64_t kTokensPerUnit = 16;
// How many pages ahead of the one being computed its K and V are prefetched.
constexpr int64_t kPrefetchPages = 1;

struct Problem {
  const float* q;  // [T, Hq, D]
  const float* k;  // [Hkv, P, ps, D]
  const float* v;
  const int32_t* kv_lens;     // [B]
  const int32_t* page_table;  // [B, Pmax]
  const int32_t* cu_q_lens;   // [B + 1]
  float* out;                 // [T, Hq, D]
  int64_t T, Hq, D, Hkv, P, ps, B, Pmax, group;
  float sm_scale;
  std::vector<int64_t> first_unit;  // [B + 1]: request b owns units first_unit[b] .. first_unit[b + 1] - 1
};

int64_t Clamp(int64_t x, int64_t lo, int64_t hi) { return std::min(std::max(x, lo), hi); }

// exp for x <= 0 in a form the compiler vectorizes (std::exp is a scalar call without -ffast-math, which would
// also assume away the infinities used here): 2^k * e^r with |r| <= ln2 / 2 and Cephes' degree-6 polynomial
// for e^r, within ~2 ulp of expf; below -87 it returns ~1e-38 instead of 0, which weights nothing.
#pragma omp declare simd
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float e = 1.9875691500e-4f;
  e = e * r + 1.3981999507e-3f;
  e = e * r + 8.3334519073e-3f;
  e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f;
  e = e * r + 5.0000001201e-1f;
  e = e * r * r + r + 1.0f;
  return e * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
}

#if defined(__AVX512F__)
// Sixteen vectors' sums, lane j of the result = sum of a[j]'s lanes: pairs folded level by level, so 16 dot
// products cost ~24 shuffles and adds instead of a horizontal sum each.
inline __m512 SumsOf16(const __m512* a) {
  __m512 b[8], c[4], e[2];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i) {
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xdd));
}

// ExpNonPositive on 16 lanes; _mm512_scalef_ps multiplies by 2^k.
inline __m512 ExpNonPositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 e = _mm512_set1_ps(1.9875691500e-4f);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.3981999507e-3f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(8.3334519073e-3f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(4.1665795894e-2f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.6666665459e-1f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(5.0000001201e-1f));
  e = _mm512_fmadd_ps(_mm512_mul_ps(e, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(e, k);
}

// One row against one page of 16 slots, of which the first n are visible: logits as one vector, the
// online-softmax update with the accumulator's kD / 16 vectors held in registers.
template <int64_t kD>
inline void PageRow16(const float* qr, const float* kp, const float* vp, int64_t n, float& m, float& l,
                      float* ar) {
  constexpr int kVecs = kD / 16;
  __m512 q[kVecs], dots[16];
  for (int i = 0; i < kVecs; ++i) q[i] = _mm512_loadu_ps(qr + 16 * i);
  for (int j = 0; j < 16; ++j) {
    // Slots past n are never read (stale or poisoned); their lanes are masked off below.
    __m512 acc = _mm512_setzero_ps();
    if (j < n) {
      for (int i = 0; i < kVecs; ++i) acc = _mm512_fmadd_ps(q[i], _mm512_loadu_ps(kp + j * kD + 16 * i), acc);
    }
    dots[j] = acc;
  }
  const __mmask16 visible = n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
  const __m512 s = SumsOf16(dots);
  const float m_new = std::max(m, _mm512_mask_reduce_max_ps(visible, s));
  const float alpha = ExpNonPositive(m - m_new);
  const __m512 p = _mm512_maskz_mov_ps(visible, ExpNonPositive16(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
  alignas(64) float pj[16];
  _mm512_store_ps(pj, p);
  __m512 acc[kVecs];
  for (int i = 0; i < kVecs; ++i) acc[i] = _mm512_mul_ps(_mm512_loadu_ps(ar + 16 * i), _mm512_set1_ps(alpha));
  for (int64_t j = 0; j < n; ++j) {
    const __m512 w = _mm512_set1_ps(pj[j]);
    for (int i = 0; i < kVecs; ++i) acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vp + j * kD + 16 * i), acc[i]);
  }
  for (int i = 0; i < kVecs; ++i) _mm512_storeu_ps(ar + 16 * i, acc[i]);
  l = l * alpha + _mm512_reduce_add_ps(p);
  m = m_new;
}
#endif

// Token range [t0, t0 + n) of request b; its first token's position is kv_len - q_len + local index.
int64_t QueryStart(const Problem& p, int64_t b) { return Clamp(p.cu_q_lens[b], 0, p.T); }
int64_t QueryLen(const Problem& p, int64_t b) {
  return std::max<int64_t>(0, Clamp(p.cu_q_lens[b + 1], 0, p.T) - QueryStart(p, b));
}
int64_t KvLen(const Problem& p, int64_t b) { return Clamp(p.kv_lens[b], 0, p.Pmax * p.ps); }

// One unit: request b, KV head h, up to kTokensPerUnit of its tokens; rows are (token, query head of h).
// kD > 0 fixes head_dim at compile time (the common sizes): the row loops then unroll into whole vectors.
template <int64_t kD>
void AttendUnit(const Problem& p, int64_t b, int64_t h, int64_t chunk, std::vector<float>& scratch) {
  const int64_t D = kD > 0 ? kD : p.D, ps = p.ps, G = p.group;
  const int64_t q_len = QueryLen(p, b);
  const int64_t local0 = chunk * kTokensPerUnit;
  const int64_t n_tok = std::min(kTokensPerUnit, q_len - local0);
  const int64_t t0 = QueryStart(p, b) + local0;
  const int64_t pos0 = KvLen(p, b) - q_len + local0;  // position of the unit's first token
  const int64_t rows = n_tok * G;
  const int64_t last = pos0 + n_tok - 1;  // the furthest position any row sees
  if (last < 0) return;                   // inconsistent metadata: nothing visible, rows stay 0

  scratch.resize(rows * D * 2 + rows * 2 + ps);
  float* qs = scratch.data();   // [rows, D] scaled queries
  float* acc = qs + rows * D;   // [rows, D]
  float* m = acc + rows * D;    // [rows] running max
  float* l = m + rows;          // [rows] running sum
  float* s = l + rows;          // [ps] one row's logits on one page
  for (int64_t i = 0; i < n_tok; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      const float* src = p.q + ((t0 + i) * p.Hq + h * G + g) * D;
      float* dst = qs + (i * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * p.sm_scale;
    }
  }
  std::fill(acc, acc + rows * D, 0.0f);
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.0f);

  const int32_t* table = p.page_table + b * p.Pmax;
  for (int64_t first = 0; first <= last; first += ps) {
    const int64_t page = Clamp(table[first / ps], 0, p.P - 1);
    const float* kp = p.k + (h * p.P + page) * ps * D;
    const float* vp = p.v + (h * p.P + page) * ps * D;
    // A later page's K and V start on their way from memory while this one is computed.
    if (kPrefetchPages > 0 && first + kPrefetchPages * ps <= last) {
      const int64_t next = Clamp(table[first / ps + kPrefetchPages], 0, p.P - 1);
      const char* kn = reinterpret_cast<const char*>(p.k + (h * p.P + next) * ps * D);
      const char* vn = reinterpret_cast<const char*>(p.v + (h * p.P + next) * ps * D);
      for (int64_t byte = 0; byte < ps * D * 4; byte += 64) {
        __builtin_prefetch(kn + byte);
        __builtin_prefetch(vn + byte);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      // Slots past the row's own position are never read: they may hold stale or poisoned values.
      const int64_t n = std::min(ps, pos0 + r / G - first + 1);
      if (n <= 0) continue;
      const float* qr = qs + r * D;
#if defined(__AVX512F__)
      if constexpr (kD > 0 && kD % 16 == 0) {
        if (ps == 16) {
          PageRow16<kD>(qr, kp, vp, n, m[r], l[r], acc + r * D);
          continue;
        }
      }
#endif
      float page_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const float* kj = kp + j * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qr[d] * kj[d];
        s[j] = dot;
        page_max = std::max(page_max, dot);
      }
      const float m_new = std::max(m[r], page_max);
      // On the row's first page m is -inf and acc, l are 0: alpha's ~1e-38 changes nothing.
      const float alpha = ExpNonPositive(m[r] - m_new);
      float* ar = acc + r * D;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        s[j] = ExpNonPositive(s[j] - m_new);
        sum += s[j];
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      for (int64_t j = 0; j < n; ++j) {
        const float pj = s[j];
        const float* vj = vp + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] += pj * vj[d];
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    float* dst = p.out + ((t0 + r / G) * p.Hq + h * G + r % G) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv;
  }
}

void RunUnit(const Problem& p, int64_t unit, std::vector<float>& scratch) {
  const int64_t b = std::upper_bound(p.first_unit.begin(), p.first_unit.end(), unit) - p.first_unit.begin() - 1;
  const int64_t local = unit - p.first_unit[b];
  const int64_t h = local % p.Hkv, chunk = local / p.Hkv;
  if (p.D == 64) {
    AttendUnit<64>(p, b, h, chunk, scratch);
  } else if (p.D == 128) {
    AttendUnit<128>(p, b, h, chunk, scratch);
  } else {
    AttendUnit<0>(p, b, h, chunk, scratch);
  }
}

// Units are handed out one at a time from a counter; the calling thread works too and then waits only for
// the workers that took a unit (a task the pool starts late finds none left and touches nothing but `state`).
struct SharedWork {
  Problem problem;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
  std::mutex mu;
  std::condition_variable done;
};

void Work(SharedWork& w) {
  w.active.fetch_add(1);
  std::vector<float> scratch;
  const int64_t total = w.problem.first_unit.back();
  for (int64_t u = w.next.fetch_add(1); u < total; u = w.next.fetch_add(1)) RunUnit(w.problem, u, scratch);
  if (w.active.fetch_sub(1) == 1) {
    std::lock_guard<std::mutex> lock(w.mu);
    w.done.notify_all();
  }
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                     ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> kv_lens,
                     ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> cu_q_lens, float sm_scale,
                     ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  auto vd = v_pages.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end())) {
    return ffi::Error::InvalidArgument("cpu ragged paged attention: q, pages or page_table of the wrong rank");
  }
  auto w = std::make_shared<SharedWork>();
  Problem& p = w->problem;
  p.T = qd[0], p.Hq = qd[1], p.D = qd[2];
  p.Hkv = kd[0], p.P = kd[1], p.ps = kd[2];
  p.B = td[0], p.Pmax = td[1];
  if (kd[3] != p.D || p.Hkv == 0 || p.Hq % p.Hkv != 0 || kv_lens.element_count() != p.B ||
      cu_q_lens.element_count() != p.B + 1 || p.P == 0 || p.ps == 0) {
    return ffi::Error::InvalidArgument("cpu ragged paged attention: inconsistent shapes");
  }
  auto od = out->dimensions();
  if (!std::equal(qd.begin(), qd.end(), od.begin(), od.end())) {
    return ffi::Error::InvalidArgument("cpu ragged paged attention: the output's shape is not q's");
  }
  // Overlapping token ranges would have two threads write the same rows; the engine never sends them.
  for (int64_t b = 0; b < td[0]; ++b) {
    if (cu_q_lens.typed_data()[b + 1] < cu_q_lens.typed_data()[b]) {
      return ffi::Error::InvalidArgument("cpu ragged paged attention: cu_q_lens must not decrease");
    }
  }
  p.group = p.Hq / p.Hkv;
  p.q = q.typed_data(), p.k = k_pages.typed_data(), p.v = v_pages.typed_data();
  p.kv_lens = kv_lens.typed_data(), p.page_table = page_table.typed_data();
  p.cu_q_lens = cu_q_lens.typed_data(), p.out = out->typed_data();
  p.sm_scale = sm_scale;
  // Rows of padding tokens, and of requests whose metadata is inconsistent, are 0.
  std::memset(p.out, 0, sizeof(float) * p.T * p.Hq * p.D);
  p.first_unit.assign(p.B + 1, 0);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t chunks = (QueryLen(p, b) + kTokensPerUnit - 1) / kTokensPerUnit;
    p.first_unit[b + 1] = p.first_unit[b] + chunks * p.Hkv;
  }
  const int64_t total = p.first_unit.back();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([w] { Work(*w); });
  Work(*w);
  std::unique_lock<std::mutex> lock(w->mu);
  w->done.wait(lock, [&] { return w->active.load() == 0; });
  return ffi::Error::Success();
}

}  // namespace

// Whether this build has the AVX-512 path (pages of 16 slots, head_dim 64 or 128), which also beats XLA's
// products on prefill; the portable path does not.
extern "C" int JaxpageCpuAttentionVectorized() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpageRaggedPagedAttentionF32, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pages
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Attr<float>("sm_scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
