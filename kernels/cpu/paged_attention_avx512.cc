// Paged decode attention, AVX-512 (F + BW) path: 16 lanes of the head dim per vector, a 16-key chunk's logits
// in one vector with lane masks. The loops are shared with the AVX2 path (paged_attention_simd.h); this file
// holds what differs beyond the width, and compiles it all for AVX-512 only (see isa.h). The algorithm is
// described in paged_attention.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "paged_attention.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace decode {
namespace avx512 {
TOKENLAB_BEGIN_TARGET(TOKENLAB_AVX512_ISA)
// GCC 12.1-12.2 report the don't-care pass-through operand (__Y) of AVX-512 intrinsics such as _mm512_max_ps as
// used uninitialized once inlined here (GCC bug 105593): the all-ones mask discards it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace {

#include "simd_avx512.h"

struct Vec : F32 {
  // scalef builds 2^n for subnormal results too, so Exp covers a wider range than from the exponent bits.
  static constexpr float kExpMin = -103.f, kExpMax = 88.7f;
  static V ScaleByPow2(V p, V n) { return _mm512_scalef_ps(p, n); }
  static float SoftmaxTerms(const Args& a, const V* dots, int64_t cnt, float slope, float jpos0, float* m,
                            float* shift, float* p_out);
};

#include "paged_attention_simd.h"
static_assert(Vec::kLanes == kLanes, "paged_attention.cc splits the work by kLanes");

// 16 vectors -> one vector whose lane t is the horizontal sum of v[t].
inline __m512 TransposeSum16(const __m512 v[16]) {
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

inline float Vec::SoftmaxTerms(const Args& a, const __m512* dots, int64_t cnt, float slope, float jpos0,
                               float* m, float* shift, float* p_out) {
  const __m512 lane = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __mmask16 valid = static_cast<__mmask16>((1u << cnt) - 1);
  __m512 x = _mm512_mul_ps(TransposeSum16(dots), _mm512_set1_ps(a.scale));
  if (a.soft_cap > 0.f) {
    const __m512 cap = _mm512_set1_ps(a.soft_cap);
    x = _mm512_mul_ps(cap, Tanh<Vec>(_mm512_div_ps(x, cap)));
  }
  if (a.slopes) x = _mm512_fmadd_ps(_mm512_set1_ps(slope), _mm512_add_ps(lane, _mm512_set1_ps(jpos0)), x);
  x = _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), x);
  const float m_old = *m;
  // A NaN logit makes the head's output NaN, as in the reference: the running max becomes NaN and stays so.
  const bool nan = _mm512_mask_cmp_ps_mask(valid, x, x, _CMP_UNORD_Q) != 0;
  const float m_new = nan ? std::numeric_limits<float>::quiet_NaN()
                          : std::max(m_old, _mm512_mask_reduce_max_ps(valid, x));
  const __m512 pr = _mm512_maskz_mov_ps(valid, Exp<Vec>(_mm512_sub_ps(x, _mm512_set1_ps(m_new))));
  _mm512_store_ps(p_out, pr);
  *shift = m_old - m_new;  // -inf on the first chunk, whose state is still zero
  *m = m_new;
  return _mm512_reduce_add_ps(pr);
}

}  // namespace

void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
  Walk<Vec>(a, b, j0, j1, unit_state);
}

#pragma GCC diagnostic pop
TOKENLAB_END_TARGET
}  // namespace avx512
}  // namespace decode
}  // namespace tokenlab

#endif  // TOKENLAB_X86
