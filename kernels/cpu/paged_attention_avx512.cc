// Paged decode attention, AVX-512 (F + BW) path: 16 keys per chunk, 16 lanes of the head dim per vector.
// Compiled per function for AVX-512 and run only where the CPU has it (see isa.h); the algorithm is described
// in paged_attention.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "paged_attention.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace decode {
namespace avx512 {
namespace {

// exp for float32 lanes: 2^n * e^r with |r| <= ln2/2, degree-6 Taylor polynomial (rel. error ~2e-7).
TOKENLAB_TARGET_AVX512 inline __m512 Exp(__m512 x) {
  // max/min return their second operand when either is NaN: NaN stays NaN.
  x = _mm512_max_ps(_mm512_set1_ps(-103.f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), x);
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

constexpr int kHeadBlock = 4;  // query heads of one kv head served by each load of its keys and values

// Why the loops run this way: consecutive tokens of a kv head sit K * D floats apart (4 KiB for K=8, D=128), so
// the same head-dim slice of a chunk's tokens falls into one L1 set, and a chunk holds more such lines than
// the set has ways. Every key and value line is therefore used by all the block's query heads as soon as it
// is loaded, instead of being reloaded (from L2) once per query head.

// dots[gi][t] = the 16 partial sums of q[gi] . k[t] (summed across lanes later), two tokens per step.
template <int GN>
TOKENLAB_TARGET_AVX512 inline void KeyDots(const float* const* q, const float* kbase, int64_t row_stride,
                                           int64_t dv, int64_t cnt, __m512 (*dots)[16]) {
  int64_t t = 0;
  for (; t + 2 <= cnt; t += 2) {
    const float* k0 = kbase + t * row_stride;
    const float* k1 = k0 + row_stride;
    __m512 acc[GN][2];
    for (int gi = 0; gi < GN; ++gi) acc[gi][0] = acc[gi][1] = _mm512_setzero_ps();
    for (int64_t v = 0; v < dv; ++v) {
      const __m512 a0 = _mm512_loadu_ps(k0 + 16 * v), a1 = _mm512_loadu_ps(k1 + 16 * v);
      for (int gi = 0; gi < GN; ++gi) {
        const __m512 qv = _mm512_loadu_ps(q[gi] + 16 * v);
        acc[gi][0] = _mm512_fmadd_ps(qv, a0, acc[gi][0]);
        acc[gi][1] = _mm512_fmadd_ps(qv, a1, acc[gi][1]);
      }
    }
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = acc[gi][0], dots[gi][t + 1] = acc[gi][1];
  }
  if (t < cnt) {
    const float* k0 = kbase + t * row_stride;
    __m512 acc[GN];
    for (int gi = 0; gi < GN; ++gi) acc[gi] = _mm512_setzero_ps();
    for (int64_t v = 0; v < dv; ++v) {
      const __m512 a0 = _mm512_loadu_ps(k0 + 16 * v);
      for (int gi = 0; gi < GN; ++gi) acc[gi] = _mm512_fmadd_ps(_mm512_loadu_ps(q[gi] + 16 * v), a0, acc[gi]);
    }
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = acc[gi];
  }
  for (++t; t < 16; ++t)
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = _mm512_setzero_ps();
}

// out[gi] = corr[gi] * out[gi] + sum_t p[gi][t] * v[t], 16 * NV floats of the head dim at a time.
template <int GN, int NV>
TOKENLAB_TARGET_AVX512 inline void ValueBlock(const float* vbase, int64_t row_stride, int64_t cnt,
                                              const float (*p)[16], const float* corr, float* acc, int64_t d,
                                              int64_t off) {
  __m512 o[GN][NV];
  for (int gi = 0; gi < GN; ++gi)
    for (int j = 0; j < NV; ++j)
      o[gi][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + gi * d + off + 16 * j), _mm512_set1_ps(corr[gi]));
  for (int64_t t = 0; t < cnt; ++t) {
    __m512 vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = _mm512_loadu_ps(vbase + t * row_stride + off + 16 * j);
    for (int gi = 0; gi < GN; ++gi) {
      const __m512 pb = _mm512_set1_ps(p[gi][t]);
      for (int j = 0; j < NV; ++j) o[gi][j] = _mm512_fmadd_ps(pb, vv[j], o[gi][j]);
    }
  }
  for (int gi = 0; gi < GN; ++gi)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + gi * d + off + 16 * j, o[gi][j]);
}

template <int GN>
TOKENLAB_TARGET_AVX512 void HeadBlock(const Args& a, int64_t b, int64_t kv, int64_t g0, int64_t jc, int64_t cnt,
                                      const float* kbase, const float* vbase, Partial st) {
  const int64_t pos = a.lens[b] - 1;
  const int64_t row_stride = a.kh * a.d;
  const __m512 lane = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __mmask16 valid = static_cast<__mmask16>((1u << cnt) - 1);
  const __m512 jpos = _mm512_add_ps(lane, _mm512_set1_ps(static_cast<float>(jc - pos)));  // j - pos
  alignas(64) __m512 dots[GN][16];
  alignas(64) float p[GN][16];
  alignas(64) float corr[16] = {};
  float lsum[GN];
  const float* q[GN];
  for (int gi = 0; gi < GN; ++gi) q[gi] = a.q + (b * a.h + kv * a.g + g0 + gi) * a.d;
  KeyDots<GN>(q, kbase, row_stride, a.d / 16, cnt, dots);
  for (int gi = 0; gi < GN; ++gi) {
    const int64_t g = g0 + gi;
    __m512 x = _mm512_mul_ps(TransposeSum16(dots[gi]), _mm512_set1_ps(a.scale));
    if (a.soft_cap > 0.f) {
      const __m512 cap = _mm512_set1_ps(a.soft_cap);
      x = _mm512_mul_ps(cap, Tanh(_mm512_div_ps(x, cap)));
    }
    if (a.slopes) x = _mm512_fmadd_ps(_mm512_set1_ps(a.slopes[kv * a.g + g]), jpos, x);
    x = _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), x);
    const float m_old = st.m[g];
    // A NaN logit makes the head's output NaN, as in the reference: the running max becomes NaN and stays so.
    const bool nan = _mm512_mask_cmp_ps_mask(valid, x, x, _CMP_UNORD_Q) != 0;
    const float m_new = nan ? std::numeric_limits<float>::quiet_NaN()
                            : std::max(m_old, _mm512_mask_reduce_max_ps(valid, x));
    const __m512 pr = _mm512_maskz_mov_ps(valid, Exp(_mm512_sub_ps(x, _mm512_set1_ps(m_new))));
    _mm512_store_ps(p[gi], pr);
    lsum[gi] = _mm512_reduce_add_ps(pr);
    corr[gi] = m_old - m_new;  // -inf on the first chunk, whose state is still zero
    st.m[g] = m_new;
  }
  _mm512_store_ps(corr, Exp(_mm512_load_ps(corr)));
  for (int gi = 0; gi < GN; ++gi) st.l[g0 + gi] = st.l[g0 + gi] * corr[gi] + lsum[gi];
  float* acc = st.acc + g0 * a.d;
  int64_t off = 0;
  for (; off + 32 <= a.d; off += 32) ValueBlock<GN, 2>(vbase, row_stride, cnt, p, corr, acc, a.d, off);
  if (off < a.d) ValueBlock<GN, 1>(vbase, row_stride, cnt, p, corr, acc, a.d, off);
}

// Keys [jc, jc + cnt) of one page (cnt <= 16) for kv head kv and its G query heads.
TOKENLAB_TARGET_AVX512 void Chunk(const Args& a, int64_t b, int64_t kv, int64_t jc, int64_t cnt, Partial st) {
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

TOKENLAB_TARGET_AVX512 void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
  const int64_t token_bytes = a.kh * a.d * 4;
  for (int64_t jc = j0; jc < j1;) {
    const int64_t cnt = std::min<int64_t>({int64_t{16}, a.s - jc % a.s, j1 - jc});
    const int64_t next = jc + cnt;
    const int64_t next_cnt = next < j1 ? std::min<int64_t>({int64_t{16}, a.s - next % a.s, j1 - next}) : 0;
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

}  // namespace avx512
}  // namespace decode
}  // namespace tokenlab

#endif  // TOKENLAB_X86
