// Paged decode attention, AVX2 (+ FMA, F16C) path: 8 keys per chunk, 8 lanes of the head dim per vector.
// Compiled per function for AVX2 and run only where the CPU has it (see isa.h); the algorithm is described in
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
namespace {

// exp for float32 lanes: 2^n * e^r with |r| <= ln2/2, degree-6 Taylor polynomial (rel. error ~2e-7). Inputs
// below -87.3 give about 1e-38 instead of less (the callers mask or never need those), so 2^n stays a normal
// float built from its exponent bits.
TOKENLAB_TARGET_AVX2 inline __m256 Exp(__m256 x) {
  // max/min return their second operand when either is NaN: NaN stays NaN.
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
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

constexpr int64_t kChunk = 16;  // keys per chunk: a whole page at the common page size
constexpr int kHeadBlock = 4;   // query heads of one kv head served by each load of its keys and values

// Why the loops run this way: consecutive tokens of a kv head sit K * D floats apart (4 KiB for K=8, D=128), so
// the same head-dim slice of a chunk's tokens falls into one L1 set, and a chunk holds more such lines than
// the set has ways. Every key and value line is therefore used by all the block's query heads as soon as it
// is loaded, instead of being reloaded (from L2) once per query head.

// dots[gi][t] = the 8 partial sums of q[gi] . k[t] (summed across lanes later), two tokens per step.
template <int GN>
TOKENLAB_TARGET_AVX2 inline void KeyDots(const float* const* q, const float* kbase, int64_t row_stride,
                                         int64_t dv, int64_t cnt, __m256 (*dots)[kChunk]) {
  int64_t t = 0;
  for (; t + 2 <= cnt; t += 2) {
    const float* k0 = kbase + t * row_stride;
    const float* k1 = k0 + row_stride;
    __m256 acc[GN][2];
    for (int gi = 0; gi < GN; ++gi) acc[gi][0] = acc[gi][1] = _mm256_setzero_ps();
    for (int64_t v = 0; v < dv; ++v) {
      const __m256 a0 = _mm256_loadu_ps(k0 + 8 * v), a1 = _mm256_loadu_ps(k1 + 8 * v);
      for (int gi = 0; gi < GN; ++gi) {
        const __m256 qv = _mm256_loadu_ps(q[gi] + 8 * v);
        acc[gi][0] = _mm256_fmadd_ps(qv, a0, acc[gi][0]);
        acc[gi][1] = _mm256_fmadd_ps(qv, a1, acc[gi][1]);
      }
    }
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = acc[gi][0], dots[gi][t + 1] = acc[gi][1];
  }
  if (t < cnt) {
    const float* k0 = kbase + t * row_stride;
    __m256 acc[GN];
    for (int gi = 0; gi < GN; ++gi) acc[gi] = _mm256_setzero_ps();
    for (int64_t v = 0; v < dv; ++v) {
      const __m256 a0 = _mm256_loadu_ps(k0 + 8 * v);
      for (int gi = 0; gi < GN; ++gi) acc[gi] = _mm256_fmadd_ps(_mm256_loadu_ps(q[gi] + 8 * v), a0, acc[gi]);
    }
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = acc[gi];
  }
  for (++t; t < kChunk; ++t)
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = _mm256_setzero_ps();
}

// out[gi] = corr[gi] * out[gi] + sum_t p[gi][t] * v[t], 16 floats of the head dim (NV = 2 vectors) at a time.
template <int GN, int NV>
TOKENLAB_TARGET_AVX2 inline void ValueBlock(const float* vbase, int64_t row_stride, int64_t cnt,
                                            const float (*p)[kChunk], const float* corr, float* acc, int64_t d,
                                            int64_t off) {
  __m256 o[GN][NV];
  for (int gi = 0; gi < GN; ++gi)
    for (int j = 0; j < NV; ++j)
      o[gi][j] = _mm256_mul_ps(_mm256_loadu_ps(acc + gi * d + off + 8 * j), _mm256_set1_ps(corr[gi]));
  for (int64_t t = 0; t < cnt; ++t) {
    __m256 vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = _mm256_loadu_ps(vbase + t * row_stride + off + 8 * j);
    for (int gi = 0; gi < GN; ++gi) {
      const __m256 pb = _mm256_broadcast_ss(&p[gi][t]);
      for (int j = 0; j < NV; ++j) o[gi][j] = _mm256_fmadd_ps(pb, vv[j], o[gi][j]);
    }
  }
  for (int gi = 0; gi < GN; ++gi)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(acc + gi * d + off + 8 * j, o[gi][j]);
}

template <int GN>
TOKENLAB_TARGET_AVX2 inline void WeightedValues(const float* vbase, int64_t row_stride, int64_t cnt,
                                                const float (*p)[kChunk], const float* corr, float* acc,
                                                int64_t d) {
  int64_t off = 0;
  for (; off + 16 <= d; off += 16) ValueBlock<GN, 2>(vbase, row_stride, cnt, p, corr, acc, d, off);
  if (off < d) ValueBlock<GN, 1>(vbase, row_stride, cnt, p, corr, acc, d, off);
}

// Softmax terms of one query head for the chunk: logits from its dots, the running max, p = exp(x - m_new)
// into p_out (zero past cnt), and the returned sum of p; *shift = m_old - m_new.
TOKENLAB_TARGET_AVX2 inline float SoftmaxTerms(const Args& a, const __m256* dots, int64_t cnt, float slope,
                                               float jpos0, float* m, float* shift, float* p_out) {
  const __m256 lane = _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0);
  __m256 x[2];
  for (int half = 0; half < 2; ++half) {
    __m256 y = _mm256_mul_ps(TransposeSum8(dots + 8 * half), _mm256_set1_ps(a.scale));
    if (a.soft_cap > 0.f) {
      const __m256 cap = _mm256_set1_ps(a.soft_cap);
      y = _mm256_mul_ps(cap, Tanh(_mm256_div_ps(y, cap)));
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
    const __m256 pr = _mm256_and_ps(keep, Exp(_mm256_sub_ps(x[half], mv)));
    _mm256_store_ps(p_out + 8 * half, pr);
    sum = _mm256_add_ps(sum, pr);
  }
  *shift = m_old - m_new;  // -inf on the first chunk, whose state is still zero
  *m = m_new;
  return HorizontalSum(sum);
}

template <int GN>
TOKENLAB_TARGET_AVX2 void HeadBlock(const Args& a, int64_t b, int64_t kv, int64_t g0, int64_t jc, int64_t cnt,
                                    const float* kbase, const float* vbase, Partial st) {
  const int64_t pos = a.lens[b] - 1;
  const int64_t row_stride = a.kh * a.d;
  alignas(32) __m256 dots[GN][kChunk];
  alignas(32) float p[GN][kChunk];
  alignas(32) float corr[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float lsum[GN];
  const float* q[GN];
  for (int gi = 0; gi < GN; ++gi) q[gi] = a.q + (b * a.h + kv * a.g + g0 + gi) * a.d;
  KeyDots<GN>(q, kbase, row_stride, a.d / 8, cnt, dots);
  for (int gi = 0; gi < GN; ++gi) {
    const int64_t g = g0 + gi;
    const float slope = a.slopes ? a.slopes[kv * a.g + g] : 0.f;
    lsum[gi] = SoftmaxTerms(a, dots[gi], cnt, slope, static_cast<float>(jc - pos), &st.m[g], &corr[gi], p[gi]);
  }
  _mm256_store_ps(corr, Exp(_mm256_load_ps(corr)));
  for (int gi = 0; gi < GN; ++gi) st.l[g0 + gi] = st.l[g0 + gi] * corr[gi] + lsum[gi];
  WeightedValues<GN>(vbase, row_stride, cnt, p, corr, st.acc + g0 * a.d, a.d);
}

// Keys [jc, jc + cnt) of one page (cnt <= kChunk) for kv head kv and its G query heads.
TOKENLAB_TARGET_AVX2 void Chunk(const Args& a, int64_t b, int64_t kv, int64_t jc, int64_t cnt, Partial st) {
  const int64_t page = a.bt[b * a.max_pages + jc / a.s];
  const int64_t t0 = jc % a.s;
  const float* kbase = a.kp + ((page * a.s + t0) * a.kh + kv) * a.d;
  const float* vbase = a.vp + ((page * a.s + t0) * a.kh + kv) * a.d;
  for (int64_t g0 = 0; g0 < a.g; g0 += kHeadBlock) {
    switch (std::min<int64_t>(kHeadBlock, a.g - g0)) {
      case 4: HeadBlock<4>(a, b, kv, g0, jc, cnt, kbase, vbase, st); break;
      case 3: HeadBlock<3>(a, b, kv, g0, jc, cnt, kbase, vbase, st); break;
      case 2: HeadBlock<2>(a, b, kv, g0, jc, cnt, kbase, vbase, st); break;
      default: HeadBlock<1>(a, b, kv, g0, jc, cnt, kbase, vbase, st); break;
    }
  }
}

// The walk prefetches the next chunk's keys and values (whole 64-byte lines, into L2) while it computes the
// current one, a kv head's share at a time: the chunk is read kv head by kv head, at a stride of K * D floats,
// which the hardware prefetchers do not follow as they follow a sequential stream.
inline const char* ChunkBytes(const Args& a, const float* pages, int64_t b, int64_t j) {
  const int64_t page = a.bt[b * a.max_pages + j / a.s];
  return reinterpret_cast<const char*>(pages + (page * a.s + j % a.s) * a.kh * a.d);
}

inline void PrefetchLines(const char* base, int64_t from, int64_t to) {
  for (int64_t off = from; off < to; off += 64) _mm_prefetch(base + off, _MM_HINT_T1);
}

}  // namespace

TOKENLAB_TARGET_AVX2 void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
  const int64_t token_bytes = a.kh * a.d * 4;
  for (int64_t jc = j0; jc < j1;) {
    const int64_t cnt = std::min<int64_t>({kChunk, a.s - jc % a.s, j1 - jc});
    const int64_t next = jc + cnt;
    const int64_t next_cnt = next < j1 ? std::min<int64_t>({kChunk, a.s - next % a.s, j1 - next}) : 0;
    const char* nk = next_cnt ? ChunkBytes(a, a.kp, b, next) : nullptr;
    const char* nv = next_cnt ? ChunkBytes(a, a.vp, b, next) : nullptr;
    const int64_t next_bytes = next_cnt * token_bytes;
    const int64_t share = (next_bytes / a.kh + 63) / 64 * 64;
    for (int64_t kv = 0; kv < a.kh; ++kv) {
      if (next_cnt) {
        const int64_t from = kv * share, to = std::min(next_bytes, from + share);
        PrefetchLines(nk, from, to);
        PrefetchLines(nv, from, to);
      }
      Chunk(a, b, kv, jc, cnt, StateAt(a, unit_state, kv));
    }
    jc = next;
  }
}

}  // namespace avx2
}  // namespace decode
}  // namespace tokenlab

#endif  // TOKENLAB_X86
