// Paged decode attention, AVX2 (+ FMA, F16C) path: 8 keys per chunk, 8 lanes of the head dim per vector.
// Compiled per function for AVX2 and run only where the CPU has it (see isa.h); the algorithm is described in
// paged_attention.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "paged_attention.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace decode {
namespace avx2 {
namespace {

// exp for float32 lanes: 2^n * e^r with |r| <= ln2/2, degree-6 Taylor polynomial (rel. error ~2e-7). Inputs
// below -87.3 give about 1e-38 instead of less (the callers mask or never need those), so 2^n stays a normal
// float built from its exponent bits.
TOKENLAB_TARGET_AVX2 inline __m256 Exp(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

TOKENLAB_TARGET_AVX2 inline __m256 Tanh(__m256 y) {  // 1 - 2 / (e^{2y} + 1)
  const __m256 e = Exp(_mm256_add_ps(y, y));
  return _mm256_sub_ps(_mm256_set1_ps(1.f),
                       _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, _mm256_set1_ps(1.f))));
}

// 8 vectors -> one vector whose lane t is the horizontal sum of v[t].
TOKENLAB_TARGET_AVX2 inline __m256 TransposeSum8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

TOKENLAB_TARGET_AVX2 inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

TOKENLAB_TARGET_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// Keys [jc, jc + cnt) of one page (cnt <= 8) for kv head kv, all G query heads.
TOKENLAB_TARGET_AVX2 void Chunk(const Args& a, int64_t b, int64_t kv, int64_t jc, int64_t cnt, Partial st) {
  const int64_t pos = a.lens[b] - 1;
  const int64_t dv = a.d / 8;
  const int64_t row_stride = a.kh * a.d;  // floats between consecutive tokens of a page
  alignas(32) float pbuf[8];
  const __m256 lane = _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t page = a.bt[b * a.max_pages + jc / a.s];
  const int64_t t0 = jc % a.s;
  const float* kbase = a.kp + ((page * a.s + t0) * a.kh + kv) * a.d;
  const float* vbase = a.vp + ((page * a.s + t0) * a.kh + kv) * a.d;
  const __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(cnt)), _CMP_LT_OQ);
  const __m256 jpos = _mm256_add_ps(lane, _mm256_set1_ps(static_cast<float>(jc - pos)));  // j - pos
  for (int64_t g = 0; g < a.g; ++g) {
    const int64_t h = kv * a.g + g;
    const float* qr = a.q + (b * a.h + h) * a.d;
    __m256 part[8];
    for (int t = 0; t < 8; ++t) part[t] = _mm256_setzero_ps();
    if (cnt == 8) {
      for (int64_t v = 0; v < dv; ++v) {
        const __m256 qv = _mm256_loadu_ps(qr + 8 * v);
        for (int t = 0; t < 8; ++t)
          part[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kbase + t * row_stride + 8 * v), part[t]);
      }
    } else {
      for (int64_t v = 0; v < dv; ++v) {
        const __m256 qv = _mm256_loadu_ps(qr + 8 * v);
        for (int t = 0; t < 8; ++t)
          if (t < cnt) part[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kbase + t * row_stride + 8 * v), part[t]);
      }
    }
    __m256 x = _mm256_mul_ps(TransposeSum8(part), _mm256_set1_ps(a.scale));
    if (a.soft_cap > 0.f) {
      const __m256 cap = _mm256_set1_ps(a.soft_cap);
      x = _mm256_mul_ps(cap, Tanh(_mm256_div_ps(x, cap)));
    }
    if (a.slopes) x = _mm256_fmadd_ps(_mm256_set1_ps(a.slopes[h]), jpos, x);
    x = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), x, valid);
    const float m_old = st.m[g];
    const float m_new = std::max(m_old, HorizontalMax(x));
    const float corr = std::exp(m_old - m_new);
    const __m256 pr = _mm256_and_ps(valid, Exp(_mm256_sub_ps(x, _mm256_set1_ps(m_new))));
    st.l[g] = st.l[g] * corr + HorizontalSum(pr);
    st.m[g] = m_new;
    _mm256_store_ps(pbuf, pr);
    float* acc = st.acc + g * a.d;
    const __m256 cv = _mm256_set1_ps(corr);
    for (int64_t v = 0; v < dv; ++v) {
      __m256 o = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * v), cv);
      for (int t = 0; t < 8; ++t)
        if (t < cnt) o = _mm256_fmadd_ps(_mm256_broadcast_ss(pbuf + t), _mm256_loadu_ps(vbase + t * row_stride + 8 * v), o);
      _mm256_storeu_ps(acc + 8 * v, o);
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

TOKENLAB_TARGET_AVX2 void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
  for (int64_t jc = j0; jc < j1;) {
    const int64_t cnt = std::min<int64_t>({kLanes, a.s - jc % a.s, j1 - jc});
    const int64_t next = jc + cnt;
    if (next < j1 && next % a.s == 0) PrefetchPage(a, a.bt[b * a.max_pages + next / a.s]);
    for (int64_t kv = 0; kv < a.kh; ++kv) Chunk(a, b, kv, jc, cnt, StateAt(a, unit_state, kv));
    jc = next;
  }
}

}  // namespace avx2
}  // namespace decode
}  // namespace tokenlab

#endif  // TOKENLAB_X86
