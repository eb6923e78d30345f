// Paged decode attention, AVX2 (+ FMA, F16C) path: 8 lanes of the head dim per vector, a 16-key chunk's logits
// in two vectors. The loops are shared with the AVX-512 path (paged_attention_simd.h); this file holds what
// differs beyond the width, and compiles it all for AVX2 only (see isa.h). The algorithm is described in
// paged_attention.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "paged_attention.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace decode {
namespace avx2 {
TOKENLAB_BEGIN_TARGET(TOKENLAB_AVX2_ISA)
namespace {

#include "simd_avx2.h"

struct Vec : F32 {
  // 2^n from its exponent bits needs a normal float: inputs below -87.3 give about 1e-38 instead of less (the
  // callers mask or never need those).
  static constexpr float kExpMin = -87.3f, kExpMax = 88.3f;
  static V ScaleByPow2(V p, V n) { return Mul(p, Pow2(n)); }
  static float SoftmaxTerms(const Args& a, const V* dots, int64_t cnt, float slope, float jpos0, float* m,
                            float* shift, float* p_out);
};

#include "paged_attention_simd.h"
static_assert(Vec::kLanes == kLanes, "paged_attention.cc splits the work by kLanes");

// 8 vectors -> one vector whose lane t is the horizontal sum of v[t].
inline __m256 TransposeSum8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

inline float Vec::SoftmaxTerms(const Args& a, const __m256* dots, int64_t cnt, float slope, float jpos0,
                               float* m, float* shift, float* p_out) {
  const __m256 lane = _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0);
  __m256 x[2];
  for (int half = 0; half < 2; ++half) {
    __m256 y = _mm256_mul_ps(TransposeSum8(dots + 8 * half), _mm256_set1_ps(a.scale));
    if (a.soft_cap > 0.f) {
      const __m256 cap = _mm256_set1_ps(a.soft_cap);
      y = _mm256_mul_ps(cap, Tanh<Vec>(_mm256_div_ps(y, cap)));
    }
    const __m256 j = _mm256_add_ps(lane, _mm256_set1_ps(jpos0 + 8.f * half));
    if (a.slopes) y = _mm256_fmadd_ps(_mm256_set1_ps(slope), j, y);
    const __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(cnt - 8 * half)), _CMP_LT_OQ);
    x[half] = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), y, valid);
  }
  const float m_old = *m;
  // A NaN logit makes the head's output NaN, as in the reference: the running max becomes NaN and stays so.
  const bool nan = _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(x[0], x[0], _CMP_UNORD_Q),
                                                   _mm256_cmp_ps(x[1], x[1], _CMP_UNORD_Q))) != 0;
  const float m_new = nan ? std::numeric_limits<float>::quiet_NaN()
                          : std::max(m_old, HorizontalMax(_mm256_max_ps(x[0], x[1])));
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 sum = _mm256_setzero_ps();
  for (int half = 0; half < 2; ++half) {
    // Lanes past cnt hold -inf, which Exp turns into ~1e-38: zero them (and keep NaN).
    const __m256 keep = _mm256_cmp_ps(x[half], _mm256_set1_ps(kNegInf), _CMP_NEQ_UQ);
    const __m256 pr = _mm256_and_ps(keep, Exp<Vec>(_mm256_sub_ps(x[half], mv)));
    _mm256_store_ps(p_out + 8 * half, pr);
    sum = _mm256_add_ps(sum, pr);
  }
  *shift = m_old - m_new;  // -inf on the first chunk, whose state is still zero
  *m = m_new;
  return HorizontalSum(sum);
}

}  // namespace

void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
  Walk<Vec>(a, b, j0, j1, unit_state);
}

TOKENLAB_END_TARGET
}  // namespace avx2
}  // namespace decode
}  // namespace tokenlab

#endif  // TOKENLAB_X86
