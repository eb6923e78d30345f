// Grouped SwiGLU expert FFN, AVX-512 (F + BW) path: 16 columns per vector. Compiled per function for AVX-512
// and run only where the CPU has it (see isa.h); the algorithm is described in moe_ffn.cc.
#include <cstdint>

#include "moe_ffn.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace moe {
namespace avx512 {
namespace {

constexpr int kRows = 8;  // rows of a register block: 8 x 2 vectors = 16 accumulators of the 32 registers

// C[r0 : r0+MB, c : c+16*NV] (+)= A[r0 : r0+MB, k0:k1] @ B[k0:k1, c : c+16*NV], the sums in registers.
template <int MB, int NV>
TOKENLAB_TARGET_AVX512 inline void Kernel(const Gemm& g, int64_t r0, int64_t k0, int64_t k1, int64_t c,
                                          bool accumulate) {
  __m512 acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(g.c + (r0 + m) * g.ldc + c + 16 * v) : _mm512_setzero_ps();
  const float* a0 = g.a + r0 * g.lda;
  for (int64_t k = k0; k < k1; ++k) {
    const float* brow = g.b + k * g.ldb + c;
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(brow + 16 * v);
    for (int m = 0; m < MB; ++m) {
      const __m512 x = _mm512_set1_ps(a0[m * g.lda + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(x, b[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(g.c + (r0 + m) * g.ldc + c + 16 * v, acc[m][v]);
}

// Every column strip of one row block; few rows (decode) take wider strips for more independent sums.
template <int MB>
TOKENLAB_TARGET_AVX512 void Rows(const Gemm& g, int64_t r0, int64_t k0, int64_t k1, int64_t c0, int64_t c1,
                                 bool accumulate) {
  int64_t c = c0;
  if (MB <= 2)
    for (; c + 64 <= c1; c += 64) Kernel<MB, 4>(g, r0, k0, k1, c, accumulate);
  for (; c + 32 <= c1; c += 32) Kernel<MB, 2>(g, r0, k0, k1, c, accumulate);
  for (; c + 16 <= c1; c += 16) Kernel<MB, 1>(g, r0, k0, k1, c, accumulate);
}

// exp(x) for x <= 0, as in the AVX2 path.
TOKENLAB_TARGET_AVX512 inline __m512 ExpNonPositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

}  // namespace

TOKENLAB_TARGET_AVX512 void StreamGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1) {
  const int64_t vec_end = c0 + (c1 - c0) / 16 * 16;
  for (int64_t m = 0; m < g.m; ++m)
    for (int64_t c = c0; c < c1; ++c) g.c[m * g.ldc + c] = 0.f;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* b0 = g.b + k * g.ldb;
    __m512 a[kStreamMaxRows][4];
    for (int64_t m = 0; m < g.m; ++m)
      for (int j = 0; j < 4; ++j) a[m][j] = _mm512_set1_ps(g.a[m * g.lda + k + j]);
    for (int64_t c = c0; c < vec_end; c += 16) {
      const __m512 v0 = _mm512_loadu_ps(b0 + c), v1 = _mm512_loadu_ps(b0 + g.ldb + c);
      const __m512 v2 = _mm512_loadu_ps(b0 + 2 * g.ldb + c), v3 = _mm512_loadu_ps(b0 + 3 * g.ldb + c);
      for (int64_t m = 0; m < g.m; ++m) {
        float* cp = g.c + m * g.ldc + c;
        __m512 s = _mm512_fmadd_ps(a[m][0], v0, _mm512_loadu_ps(cp));
        s = _mm512_fmadd_ps(a[m][1], v1, s);
        s = _mm512_fmadd_ps(a[m][2], v2, s);
        _mm512_storeu_ps(cp, _mm512_fmadd_ps(a[m][3], v3, s));
      }
    }
  }
  for (; k < k1; ++k) {
    const float* b0 = g.b + k * g.ldb;
    for (int64_t m = 0; m < g.m; ++m) {
      const __m512 a = _mm512_set1_ps(g.a[m * g.lda + k]);
      float* cp = g.c + m * g.ldc;
      for (int64_t c = c0; c < vec_end; c += 16)
        _mm512_storeu_ps(cp + c, _mm512_fmadd_ps(a, _mm512_loadu_ps(b0 + c), _mm512_loadu_ps(cp + c)));
    }
  }
  if (vec_end < c1) ScalarGemm(g, k0, k1, vec_end, c1, false);
}

TOKENLAB_TARGET_AVX512 void BlockGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1,
                                      bool accumulate) {
  const int64_t vec_end = c0 + (c1 - c0) / 16 * 16;
  int64_t r = 0;
  for (; r + kRows <= g.m; r += kRows) Rows<kRows>(g, r, k0, k1, c0, vec_end, accumulate);
  switch (g.m - r) {
    case 7: Rows<7>(g, r, k0, k1, c0, vec_end, accumulate); break;
    case 6: Rows<6>(g, r, k0, k1, c0, vec_end, accumulate); break;
    case 5: Rows<5>(g, r, k0, k1, c0, vec_end, accumulate); break;
    case 4: Rows<4>(g, r, k0, k1, c0, vec_end, accumulate); break;
    case 3: Rows<3>(g, r, k0, k1, c0, vec_end, accumulate); break;
    case 2: Rows<2>(g, r, k0, k1, c0, vec_end, accumulate); break;
    case 1: Rows<1>(g, r, k0, k1, c0, vec_end, accumulate); break;
    default: break;
  }
  if (vec_end < c1) ScalarGemm(g, k0, k1, vec_end, c1, accumulate);
}

// silu(h) * u, as in the AVX2 path (AVX512F only: the sign is set through the integer view).
TOKENLAB_TARGET_AVX512 void SiluMul(float* h, const float* u, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(h + i);
    const __m512 t = ExpNonPositive(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), sign)));
    const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, t));
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_blend_ps(neg, inv, _mm512_mul_ps(t, inv));
    _mm512_storeu_ps(h + i, _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_loadu_ps(u + i)));
  }
  if (i < n) ScalarSiluMul(h + i, u + i, n - i);
}

}  // namespace avx512
}  // namespace moe
}  // namespace tokenlab

#endif  // TOKENLAB_X86
