// Paged decode attention, AVX-512 (F + BW) path: 16 keys per chunk, 16 lanes of the head dim per vector.
// Compiled per function for AVX-512 and run only where the CPU has it (see isa.h); the algorithm is described
// in paged_attention.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "paged_attention.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace decode {
namespace avx512 {
namespace {

// exp for float32 lanes: 2^n * e^r with |r| <= ln2/2, degree-6 Taylor polynomial (rel. error ~2e-7).
TOKENLAB_TARGET_AVX512 inline __m512 Exp(__m512 x) {
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

TOKENLAB_TARGET_AVX512 inline __m512 Tanh(__m512 y) {  // 1 - 2 / (e^{2y} + 1)
  const __m512 e = Exp(_mm512_add_ps(y, y));
  return _mm512_sub_ps(_mm512_set1_ps(1.f),
                       _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
}

// 16 vectors -> one vector whose lane t is the horizontal sum of v[t].
TOKENLAB_TARGET_AVX512 inline __m512 TransposeSum16(__m512 v[16]) {
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

// Keys [jc, jc + cnt) of one page (cnt <= 16) for kv head kv, all G query heads.
TOKENLAB_TARGET_AVX512 void Chunk(const Args& a, int64_t b, int64_t kv, int64_t jc, int64_t cnt, Partial st) {
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
inline void PrefetchPage(const Args& a, int64_t page) {
  const int64_t bytes = a.s * a.kh * a.d * 4;
  const char* k = reinterpret_cast<const char*>(a.kp + page * a.s * a.kh * a.d);
  const char* v = reinterpret_cast<const char*>(a.vp + page * a.s * a.kh * a.d);
  for (int64_t off = 0; off < std::min<int64_t>(bytes, 4096); off += 64) {
    _mm_prefetch(k + off, _MM_HINT_T1);
    _mm_prefetch(v + off, _MM_HINT_T1);
  }
}

}  // namespace

TOKENLAB_TARGET_AVX512 void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
  for (int64_t jc = j0; jc < j1;) {
    const int64_t cnt = std::min<int64_t>({kLanes, a.s - jc % a.s, j1 - jc});
    const int64_t next = jc + cnt;
    if (next < j1 && next % a.s == 0) PrefetchPage(a, a.bt[b * a.max_pages + next / a.s]);
    for (int64_t kv = 0; kv < a.kh; ++kv) Chunk(a, b, kv, jc, cnt, StateAt(a, unit_state, kv));
    jc = next;
  }
}

}  // namespace avx512
}  // namespace decode
}  // namespace tokenlab

#endif  // TOKENLAB_X86
