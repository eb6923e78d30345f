// Paged decode attention (one query per sequence, at position kv_len - 1) as an XLA FFI handler for the CPU.
//
// For sequence b, query head h and its kv head kh = h / G (G = H / K):
//   logit[j] = scale * q[b, h] . k[j, kh]; soft cap; + alibi[h] * (j - pos); keep j in (pos - W, pos]
//   out[b, h] = softmax(logit) . v[:, kh]        (online softmax, float32; no keys -> zeros)
// Pages are NHD, [P, S, K, D]; page i of sequence b is block_tables[b, i]. Entries past the pages a sequence
// covers are never read. A covered entry outside [0, P), or kv_len outside [0, max_pages * S], is an error.
//
// Work unit: (sequence, context split). A unit walks its pages once; for each page (read front to back, a
// contiguous [S, K, D] block, so the prefetchers and the TLB see whole pages) it visits every kv head, reading
// that head's [S, D] slice of K and V exactly once for its G query heads, and keeps the running max, sum and
// output of all H heads. The context is split so that every thread gets several units, and the parts are
// merged by log-sum-exp. (Walking one kv head at a time across all pages instead — 512-byte pieces at a 4 KiB
// stride — ran at about a third of the bandwidth: a TLB miss per piece.)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define TOKENLAB_AVX512 1
#endif

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tokenlab {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct DecodeArgs {
  const float* q;
  const float* kp;
  const float* vp;
  const int32_t* lens;
  const int32_t* bt;
  const float* slopes;  // [H] or nullptr
  int64_t b, h, d, p, s, kh, g, max_pages;
  float scale, soft_cap;
  int64_t window;  // 0: none
};

// State of one unit for its G heads: running max m, sum l, unnormalized output acc [G, D].
struct Partial {
  float* m;
  float* l;
  float* acc;
};

inline void KeyRange(const DecodeArgs& a, int64_t b, int64_t* lo, int64_t* hi) {
  const int64_t n = a.lens[b];
  *hi = n;
  *lo = (a.window > 0) ? std::max<int64_t>(0, n - a.window) : 0;
}

// Portable path: one key at a time.
void ScalarUnit(const DecodeArgs& a, int64_t b, int64_t kv, int64_t j0, int64_t j1, Partial st) {
  const int64_t pos = a.lens[b] - 1;
  std::vector<float> logit(a.g);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t page = a.bt[b * a.max_pages + j / a.s];
    const int64_t off = ((page * a.s + j % a.s) * a.kh + kv) * a.d;
    const float* kr = a.kp + off;
    const float* vr = a.vp + off;
    for (int64_t g = 0; g < a.g; ++g) {
      const int64_t h = kv * a.g + g;
      const float* qr = a.q + (b * a.h + h) * a.d;
      float dot = 0.f;
      for (int64_t i = 0; i < a.d; ++i) dot += qr[i] * kr[i];
      float x = dot * a.scale;
      if (a.soft_cap > 0.f) x = a.soft_cap * std::tanh(x / a.soft_cap);
      if (a.slopes) x += a.slopes[h] * static_cast<float>(j - pos);
      const float m_new = std::max(st.m[g], x);
      const float corr = std::exp(st.m[g] - m_new);  // exp(-inf) = 0 on the first key
      const float pr = std::exp(x - m_new);
      st.l[g] = st.l[g] * corr + pr;
      float* acc = st.acc + g * a.d;
      for (int64_t i = 0; i < a.d; ++i) acc[i] = acc[i] * corr + pr * vr[i];
      st.m[g] = m_new;
    }
  }
}

#ifdef TOKENLAB_AVX512

// exp for float32 lanes: 2^n * e^r with |r| <= ln2/2, degree-6 Taylor polynomial (rel. error ~2e-7).
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 Tanh(__m512 y) {  // 1 - 2 / (e^{2y} + 1)
  const __m512 e = Exp(_mm512_add_ps(y, y));
  return _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
}

// 16 vectors -> one vector whose lane t is the horizontal sum of v[t].
inline __m512 TransposeSum16(__m512 v[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 f01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 f23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f01, f23, 0x88), _mm512_shuffle_f32x4(f01, f23, 0xDD));
}

// SIMD path (D % 16 == 0): keys [jc, jc + cnt) of one page (cnt <= 16) for kv head kv, all G query heads.
void SimdChunk(const DecodeArgs& a, int64_t b, int64_t kv, int64_t jc, int64_t cnt, Partial st) {
  const int64_t pos = a.lens[b] - 1;
  const int64_t dv = a.d / 16;
  const int64_t row_stride = a.kh * a.d;  // floats between consecutive tokens of a page
  alignas(64) float pbuf[16];
  const __m512 lane = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t page = a.bt[b * a.max_pages + jc / a.s];
  const int64_t t0 = jc % a.s;
  const float* kbase = a.kp + ((page * a.s + t0) * a.kh + kv) * a.d;
  const float* vbase = a.vp + ((page * a.s + t0) * a.kh + kv) * a.d;
  const __mmask16 valid = static_cast<__mmask16>((1u << cnt) - 1);
  const __m512 jpos = _mm512_add_ps(lane, _mm512_set1_ps(static_cast<float>(jc - pos)));  // j - pos
  for (int64_t g = 0; g < a.g; ++g) {
    const int64_t h = kv * a.g + g;
    const float* qr = a.q + (b * a.h + h) * a.d;
    __m512 part[16];
    for (int t = 0; t < 16; ++t) part[t] = _mm512_setzero_ps();
    for (int64_t v = 0; v < dv; ++v) {
      const __m512 qv = _mm512_loadu_ps(qr + 16 * v);
      for (int t = 0; t < 16; ++t)
        if (t < cnt) part[t] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kbase + t * row_stride + 16 * v), part[t]);
    }
    __m512 x = _mm512_mul_ps(TransposeSum16(part), _mm512_set1_ps(a.scale));
    if (a.soft_cap > 0.f) {
      const __m512 cap = _mm512_set1_ps(a.soft_cap);
      x = _mm512_mul_ps(cap, Tanh(_mm512_div_ps(x, cap)));
    }
    if (a.slopes) x = _mm512_fmadd_ps(_mm512_set1_ps(a.slopes[h]), jpos, x);
    x = _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), x);
    const float m_old = st.m[g];
    const float m_new = std::max(m_old, _mm512_mask_reduce_max_ps(valid, x));
    const float corr = std::exp(m_old - m_new);
    const __m512 pr = _mm512_maskz_mov_ps(valid, Exp(_mm512_sub_ps(x, _mm512_set1_ps(m_new))));
    st.l[g] = st.l[g] * corr + _mm512_reduce_add_ps(pr);
    st.m[g] = m_new;
    _mm512_store_ps(pbuf, pr);
    float* acc = st.acc + g * a.d;
    const __m512 cv = _mm512_set1_ps(corr);
    for (int64_t v = 0; v < dv; ++v) {
      __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * v), cv);
      for (int t = 0; t < 16; ++t)
        if (t < cnt) o = _mm512_fmadd_ps(_mm512_set1_ps(pbuf[t]), _mm512_loadu_ps(vbase + t * row_stride + 16 * v), o);
      _mm512_storeu_ps(acc + 16 * v, o);
    }
  }
}

// Prefetch the first lines of a page's keys and values; the hardware prefetcher follows the rest of the
// (contiguous) page once the walk starts.
inline void PrefetchPage(const DecodeArgs& a, int64_t page) {
  const int64_t bytes = a.s * a.kh * a.d * 4;
  const char* k = reinterpret_cast<const char*>(a.kp + page * a.s * a.kh * a.d);
  const char* v = reinterpret_cast<const char*>(a.vp + page * a.s * a.kh * a.d);
  for (int64_t off = 0; off < std::min<int64_t>(bytes, 4096); off += 64) {
    _mm_prefetch(k + off, _MM_HINT_T1);
    _mm_prefetch(v + off, _MM_HINT_T1);
  }
}

#endif  // TOKENLAB_AVX512

ffi::Error PagedDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                           ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> kv_lens,
                           ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::F32> alibi_slopes,
                           ffi::ResultBuffer<ffi::F32> out, float scale, float soft_cap, int64_t sliding_window,
                           int64_t has_alibi, int64_t simd) {
  const std::string name = "tokenlab_paged_decode: ";
  auto qd = q.dimensions(), kd = k_pages.dimensions(), vd = v_pages.dimensions();
  auto ld = kv_lens.dimensions(), bd = block_tables.dimensions();
  if (qd.size() != 3) return ffi::Error::InvalidArgument(name + "q must be [B, H, D]");
  if (kd.size() != 4) return ffi::Error::InvalidArgument(name + "k_pages must be [P, S, K, D]");
  if (vd.size() != 4 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3])
    return ffi::Error::InvalidArgument(name + "v_pages must have k_pages' shape");
  DecodeArgs a{};
  a.b = qd[0], a.h = qd[1], a.d = qd[2];
  a.p = kd[0], a.s = kd[1], a.kh = kd[2];
  if (kd[3] != a.d) return ffi::Error::InvalidArgument(name + "k_pages head dim must equal q's");
  if (a.kh < 1 || a.h % a.kh)
    return ffi::Error::InvalidArgument(name + "num_q_heads=" + std::to_string(a.h) +
                                       " must be a multiple of num_kv_heads=" + std::to_string(a.kh));
  if (ld.size() != 1 || ld[0] != a.b) return ffi::Error::InvalidArgument(name + "kv_lens must be [B]");
  if (bd.size() != 2 || bd[0] != a.b) return ffi::Error::InvalidArgument(name + "block_tables must be [B, max_pages]");
  if (static_cast<int64_t>(alibi_slopes.element_count()) != a.h) return ffi::Error::InvalidArgument(name + "alibi_slopes must be [H]");
  a.g = a.h / a.kh;
  a.max_pages = bd[1];
  a.q = q.typed_data(), a.kp = k_pages.typed_data(), a.vp = v_pages.typed_data();
  a.lens = kv_lens.typed_data(), a.bt = block_tables.typed_data();
  a.slopes = has_alibi ? alibi_slopes.typed_data() : nullptr;
  a.scale = scale, a.soft_cap = soft_cap, a.window = sliding_window;

  // Validate every page a sequence covers before reading any of them.
  int64_t longest = 0;
  for (int64_t b = 0; b < a.b; ++b) {
    const int64_t n = a.lens[b];
    if (n < 0 || n > a.max_pages * a.s)
      return ffi::Error::InvalidArgument(name + "kv_lens[" + std::to_string(b) + "]=" + std::to_string(n) +
                                         " is outside [0, max_pages * page_size = " +
                                         std::to_string(a.max_pages * a.s) + "]");
    const int64_t used = (n + a.s - 1) / a.s;
    for (int64_t i = 0; i < used; ++i) {
      const int64_t id = a.bt[b * a.max_pages + i];
      if (id < 0 || id >= a.p)
        return ffi::Error::InvalidArgument(name + "block_tables[" + std::to_string(b) + ", " + std::to_string(i) +
                                           "]=" + std::to_string(id) + " is not a page id in [0, " +
                                           std::to_string(a.p) + ") (sequence " + std::to_string(b) + " covers " +
                                           std::to_string(used) + " pages)");
    }
    longest = std::max(longest, n);
  }

  bool use_simd = false;
#ifdef TOKENLAB_AVX512
  use_simd = simd && a.d % 16 == 0;
#endif
  // Context splits: enough units for every thread to get several, never splits shorter than 64 keys.
  const int64_t want = 8 * std::max<int64_t>(1, pool.num_threads());
  int64_t splits = std::max<int64_t>(1, (want + a.b - 1) / std::max<int64_t>(1, a.b));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, longest / 64));
  const int64_t span = std::max<int64_t>(1, (longest + splits - 1) / splits);  // keys per split
  const int64_t per = a.g * (a.d + 2);  // state of one kv head's G query heads: m, l, acc
  std::vector<float> scratch(a.b * splits * a.kh * per);
  float* outp = out->typed_data();
  auto state = [&](int64_t b, int64_t sp, int64_t kv) {
    float* base = scratch.data() + ((b * splits + sp) * a.kh + kv) * per;
    return Partial{base, base + a.g, base + 2 * a.g};
  };

  ParallelFor(pool, a.b * splits, [&](int64_t u) {
    const int64_t b = u / splits, sp = u % splits;
    for (int64_t kv = 0; kv < a.kh; ++kv) {
      Partial st = state(b, sp, kv);
      std::fill(st.m, st.m + a.g, kNegInf);
      std::fill(st.l, st.l + a.g, 0.f);
      std::fill(st.acc, st.acc + a.g * a.d, 0.f);
    }
    int64_t lo, hi;
    KeyRange(a, b, &lo, &hi);
    const int64_t j0 = std::max(lo, sp * span), j1 = std::min(hi, (sp + 1) * span);
    if (j0 >= j1) return;
#ifdef TOKENLAB_AVX512
    if (use_simd) {
      for (int64_t jc = j0; jc < j1;) {
        const int64_t cnt = std::min<int64_t>({16, a.s - jc % a.s, j1 - jc});
        const int64_t next = jc + cnt;
        if (next < j1 && next % a.s == 0) PrefetchPage(a, a.bt[b * a.max_pages + next / a.s]);
        for (int64_t kv = 0; kv < a.kh; ++kv) SimdChunk(a, b, kv, jc, cnt, state(b, sp, kv));
        jc = next;
      }
      return;
    }
#endif
    for (int64_t kv = 0; kv < a.kh; ++kv) ScalarUnit(a, b, kv, j0, j1, state(b, sp, kv));
  });
  // Merge the splits by log-sum-exp; a head with nothing to attend to gets zeros.
  for (int64_t b = 0; b < a.b; ++b)
    for (int64_t kv = 0; kv < a.kh; ++kv)
      for (int64_t g = 0; g < a.g; ++g) {
        float m = kNegInf;
        for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, state(b, sp, kv).m[g]);
        float* o = outp + (b * a.h + kv * a.g + g) * a.d;
        std::fill(o, o + a.d, 0.f);
        if (m == kNegInf) continue;
        float l = 0.f;
        for (int64_t sp = 0; sp < splits; ++sp) {
          const Partial st = state(b, sp, kv);
          if (st.m[g] == kNegInf) continue;
          const float w = std::exp(st.m[g] - m);
          l += st.l[g] * w;
          const float* acc = st.acc + g * a.d;
          for (int64_t i = 0; i < a.d; ++i) o[i] += w * acc[i];
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t i = 0; i < a.d; ++i) o[i] *= inv;
      }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace tokenlab

// The library is built with hidden visibility; only the handlers are exported.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(TokenlabPagedDecode, tokenlab::PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pages [P, S, K, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pages [P, S, K, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables [B, max_pages]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // alibi_slopes [H] (ignored unless has_alibi)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, H, D]
                                  .Attr<float>("scale")
                                  .Attr<float>("soft_cap")        // 0: none
                                  .Attr<int64_t>("sliding_window")  // 0: none
                                  .Attr<int64_t>("has_alibi")
                                  .Attr<int64_t>("simd"));
#pragma GCC visibility pop
