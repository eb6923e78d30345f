// INT4 dequant-matmul, AVX2 (+ FMA, F16C) path: 8 columns per vector. Compiled per function for AVX2 and run
// only where the CPU has it (see isa.h); the algorithm is described in int4_matmul.cc.
#include <algorithm>
#include <cstdint>

#include "int4_matmul.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace int4 {
namespace avx2 {
namespace {

TOKENLAB_TARGET_AVX2 inline __m256i Widen8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

TOKENLAB_TARGET_AVX2 inline __m256 LoadZeros(const Args& a, int64_t g, int64_t col) {
  if (!a.zeros) return _mm256_set1_ps(a.sym_zero);
  return _mm256_cvtepi32_ps(Widen8(a.zeros + g * a.n + col));
}

// kRowBlock packed rows x (8 * NV) columns for M rows of x; the partial sums stay in registers (2 * M * NV of
// the 16), then y[m, cols] += s * partial, with the zero-point term -s * z * sum(x over the group) on the
// group's first block.
template <int M, int NV>
TOKENLAB_TARGET_AVX2 inline void GemvStep(const Args& a, const float* xsum, int64_t g, bool first_block,
                                          const uint8_t* p0, const float* x0, int64_t nr, int64_t c) {
  const int64_t groups = a.k / a.group_size;
  const __m256i lo_mask = _mm256_set1_epi32(0xF);
  // Even and odd rows accumulate separately: twice the independent FMA chains.
  __m256 acc_e[M][NV], acc_o[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc_e[m][v] = acc_o[m][v] = _mm256_setzero_ps();
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* p = p0 + r * a.n + c;
    for (int v = 0; v < NV; ++v) {
      const __m256i b = Widen8(p + 8 * v);
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, lo_mask));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
      for (int m = 0; m < M; ++m) {
        acc_e[m][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x0 + m * a.k + 2 * r), lo, acc_e[m][v]);
        acc_o[m][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x0 + m * a.k + 2 * r + 1), hi, acc_o[m][v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __m256 s = _mm256_loadu_ps(a.scales + g * a.n + c + 8 * v);
    const __m256 z = first_block ? LoadZeros(a, g, c + 8 * v) : _mm256_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m256 acc = _mm256_add_ps(acc_e[m][v], acc_o[m][v]);
      if (first_block) acc = _mm256_fnmadd_ps(_mm256_set1_ps(xsum[m * groups + g]), z, acc);
      float* yp = a.y + m * a.n + c + 8 * v;
      _mm256_storeu_ps(yp, _mm256_fmadd_ps(s, acc, _mm256_loadu_ps(yp)));
    }
  }
}

template <int M>
TOKENLAB_TARGET_AVX2 void GemvRange(const Args& a, const float* xsum, int64_t c0, int64_t c1) {
  const int64_t groups = a.k / a.group_size;
  const int64_t rows_per_group = a.group_size / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = c0; c < c1; c += 8) _mm256_storeu_ps(a.y + m * a.n + c, _mm256_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t rb = 0; rb < rows_per_group; rb += kRowBlock) {
      const int64_t r0 = g * rows_per_group + rb;
      const int64_t nr = std::min(kRowBlock, rows_per_group - rb);
      const uint8_t* p0 = a.packed + r0 * a.n;
      const float* x0 = a.x + 2 * r0;
      constexpr int kNV = M == 1 ? 4 : M == 2 ? 2 : 1;
      int64_t c = c0;
      for (; c + 8 * kNV <= c1; c += 8 * kNV) GemvStep<M, kNV>(a, xsum, g, rb == 0, p0, x0, nr, c);
      for (; c < c1; c += 8) GemvStep<M, 1>(a, xsum, g, rb == 0, p0, x0, nr, c);
    }
  }
}

// An MB x 16 register-blocked float kernel (2 * MB accumulators) over one 16-column strip of a dequantized
// slab: y[m, strip] += s * (x[m, slab rows] @ slab[:, strip]).
template <int MB>
TOKENLAB_TARGET_AVX2 inline void SlabMatmul(const Args& a, const float* slab, int64_t rows, int64_t r0,
                                            __m256 s0, __m256 s1, int64_t m0, int64_t col) {
  __m256 acc[MB][2];
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const float* xb = a.x + m0 * a.k + r0;
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 w0 = _mm256_load_ps(slab + r * kTile), w1 = _mm256_load_ps(slab + r * kTile + 8);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_broadcast_ss(xb + i * a.k + r);
      acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* yr = a.y + (m0 + i) * a.n + col;
    _mm256_storeu_ps(yr, _mm256_fmadd_ps(s0, acc[i][0], _mm256_loadu_ps(yr)));
    _mm256_storeu_ps(yr + 8, _mm256_fmadd_ps(s1, acc[i][1], _mm256_loadu_ps(yr + 8)));
  }
}

}  // namespace

TOKENLAB_TARGET_AVX2 void GemvColumns(const Args& a, const float* xsum, int64_t c0, int64_t c1) {
  Args b = a;
  for (int64_t m0 = 0; m0 < a.m; m0 += 4) {
    b.x = a.x + m0 * a.k;
    b.y = a.y + m0 * a.n;
    const float* xs = xsum + m0 * (a.k / a.group_size);
    switch (std::min<int64_t>(4, a.m - m0)) {
      case 4: GemvRange<4>(b, xs, c0, c1); break;
      case 3: GemvRange<3>(b, xs, c0, c1); break;
      case 2: GemvRange<2>(b, xs, c0, c1); break;
      default: GemvRange<1>(b, xs, c0, c1); break;
    }
  }
}

TOKENLAB_TARGET_AVX2 void TiledColumns(const Args& a, int64_t c0, int64_t c1) {
  alignas(64) float slab[kSlabRows * kTile];
  const __m256i lo_mask = _mm256_set1_epi32(0xF);
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t c = c0; c < c1; c += 8) _mm256_storeu_ps(a.y + m * a.n + c, _mm256_setzero_ps());
  for (int64_t r0 = 0, r1; r0 < a.k; r0 = r1) {
    const int64_t g = r0 / a.group_size;
    r1 = std::min({r0 + kSlabRows, (g + 1) * a.group_size, a.k});
    const int64_t rows = r1 - r0;
    for (int64_t col = c0; col < c1; col += kTile) {
      __m256 z[8];
      for (int v = 0; v < 8; ++v) z[v] = LoadZeros(a, g, col + 8 * v);
      const uint8_t* p = a.packed + (r0 / 2) * a.n + col;
      for (int64_t r = 0; r < rows; r += 2, p += a.n) {
        _mm_prefetch(reinterpret_cast<const char*>(p + 4 * a.n), _MM_HINT_T0);
        float* dst = slab + r * kTile;
        for (int v = 0; v < 8; ++v) {
          const __m256i b = Widen8(p + 8 * v);
          _mm256_store_ps(dst + 8 * v, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, lo_mask)), z[v]));
          _mm256_store_ps(dst + kTile + 8 * v, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), z[v]));
        }
      }
      for (int64_t strip = 0; strip < kTile; strip += 16) {
        const __m256 s0 = _mm256_loadu_ps(a.scales + g * a.n + col + strip);
        const __m256 s1 = _mm256_loadu_ps(a.scales + g * a.n + col + strip + 8);
        const float* w = slab + strip;
        int64_t m0 = 0;
        for (; m0 + 6 <= a.m; m0 += 6) SlabMatmul<6>(a, w, rows, r0, s0, s1, m0, col + strip);
        for (; m0 + 4 <= a.m; m0 += 4) SlabMatmul<4>(a, w, rows, r0, s0, s1, m0, col + strip);
        for (; m0 + 2 <= a.m; m0 += 2) SlabMatmul<2>(a, w, rows, r0, s0, s1, m0, col + strip);
        for (; m0 < a.m; ++m0) SlabMatmul<1>(a, w, rows, r0, s0, s1, m0, col + strip);
      }
    }
  }
}

}  // namespace avx2
}  // namespace int4
}  // namespace tokenlab

#endif  // TOKENLAB_X86
