// Paged decode attention, NEON path (aarch64): dot products and the weighted sum of values over 4-lane vectors,
// chunks of up to 16 keys of one page, the softmax terms per key. NEON is part of the aarch64 baseline; the
// algorithm is described in paged_attention.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "paged_attention.h"

#if defined(TOKENLAB_NEON)

namespace tokenlab {
namespace decode {
namespace neon {
namespace {

constexpr int64_t kChunk = 16;

// Keys [jc, jc + cnt) of one page (cnt <= kChunk) for kv head kv, all G query heads.
void Chunk(const Args& a, int64_t b, int64_t kv, int64_t jc, int64_t cnt, Partial st) {
  const int64_t pos = a.lens[b] - 1;
  const int64_t dv = a.d / 4;
  const int64_t row_stride = a.kh * a.d;
  const int64_t page = a.bt[b * a.max_pages + jc / a.s];
  const int64_t t0 = jc % a.s;
  const float* kbase = a.kp + ((page * a.s + t0) * a.kh + kv) * a.d;
  const float* vbase = a.vp + ((page * a.s + t0) * a.kh + kv) * a.d;
  float logit[kChunk], pr[kChunk];
  for (int64_t g = 0; g < a.g; ++g) {
    const int64_t h = kv * a.g + g;
    const float* qr = a.q + (b * a.h + h) * a.d;
    float m_chunk = kNegInf;
    for (int64_t t = 0; t < cnt; ++t) {
      const float* kr = kbase + t * row_stride;
      float32x4_t s0 = vdupq_n_f32(0.f), s1 = vdupq_n_f32(0.f);
      int64_t v = 0;
      for (; v + 2 <= dv; v += 2) {
        s0 = vfmaq_f32(s0, vld1q_f32(qr + 4 * v), vld1q_f32(kr + 4 * v));
        s1 = vfmaq_f32(s1, vld1q_f32(qr + 4 * v + 4), vld1q_f32(kr + 4 * v + 4));
      }
      if (v < dv) s0 = vfmaq_f32(s0, vld1q_f32(qr + 4 * v), vld1q_f32(kr + 4 * v));
      float x = vaddvq_f32(vaddq_f32(s0, s1)) * a.scale;
      if (a.soft_cap > 0.f) x = a.soft_cap * std::tanh(x / a.soft_cap);
      if (a.slopes) x += a.slopes[h] * static_cast<float>(jc + t - pos);
      logit[t] = x;
      m_chunk = std::isnan(x) || std::isnan(m_chunk) ? NAN : std::max(m_chunk, x);  // NaN stays NaN
    }
    const float m_new = std::isnan(m_chunk) ? m_chunk : std::max(st.m[g], m_chunk);
    const float corr = std::exp(st.m[g] - m_new);  // exp(-inf) = 0 on the first chunk
    float l = 0.f;
    for (int64_t t = 0; t < cnt; ++t) l += (pr[t] = std::exp(logit[t] - m_new));
    st.l[g] = st.l[g] * corr + l;
    st.m[g] = m_new;
    float* acc = st.acc + g * a.d;
    for (int64_t v = 0; v < dv; ++v) {
      float32x4_t o = vmulq_n_f32(vld1q_f32(acc + 4 * v), corr);
      for (int64_t t = 0; t < cnt; ++t) o = vfmaq_n_f32(o, vld1q_f32(vbase + t * row_stride + 4 * v), pr[t]);
      vst1q_f32(acc + 4 * v, o);
    }
  }
}

}  // namespace

void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
  for (int64_t jc = j0; jc < j1;) {
    const int64_t cnt = std::min<int64_t>({kChunk, a.s - jc % a.s, j1 - jc});
    for (int64_t kv = 0; kv < a.kh; ++kv) Chunk(a, b, kv, jc, cnt, StateAt(a, unit_state, kv));
    jc += cnt;
  }
}

}  // namespace neon
}  // namespace decode
}  // namespace tokenlab

#endif  // TOKENLAB_NEON
