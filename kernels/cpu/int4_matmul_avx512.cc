// INT4 dequant-matmul, AVX-512 (F + BW) path: 16 columns per vector. Compiled per function for AVX-512 and run
// only where the CPU has it (see isa.h); the algorithm is described in int4_matmul.cc.
#include <algorithm>
#include <cstdint>

#include "int4_matmul.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace int4 {
namespace avx512 {
namespace {

TOKENLAB_TARGET_AVX512 inline __m512 LoadZeros(const Args& a, int64_t g, int64_t col) {
  if (!a.zeros) return _mm512_set1_ps(a.sym_zero);
  __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zeros + g * a.n + col));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z));
}

// kRowBlock packed rows x (16 * NV) columns for M rows of x; the partial sums stay in registers, then
// y[m, cols] += s * partial, with the zero-point term -s * z * sum(x over the group) on the group's first block.
template <int M, int NV>
TOKENLAB_TARGET_AVX512 inline void GemvStep(const Args& a, const float* xsum, int64_t g, bool first_block,
                                            const uint8_t* p0, const float* x0, int64_t nr, int64_t c) {
  const int64_t groups = a.k / a.group_size;
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  // Even and odd rows accumulate separately: twice the independent FMA chains.
  __m512 acc_e[M][NV], acc_o[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc_e[m][v] = acc_o[m][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* p = p0 + r * a.n + c;
    __m512 lo[NV], hi[NV];
    for (int v = 0; v < NV; ++v) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v)));
      lo[v] = _mm512_cvtepi32_ps(_mm512_and_si512(b, lo_mask));
      hi[v] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xe = _mm512_set1_ps(x0[m * a.k + 2 * r]);
      const __m512 xo = _mm512_set1_ps(x0[m * a.k + 2 * r + 1]);
      for (int v = 0; v < NV; ++v) {
        acc_e[m][v] = _mm512_fmadd_ps(xe, lo[v], acc_e[m][v]);
        acc_o[m][v] = _mm512_fmadd_ps(xo, hi[v], acc_o[m][v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __m512 s = _mm512_loadu_ps(a.scales + g * a.n + c + 16 * v);
    const __m512 z = first_block ? LoadZeros(a, g, c + 16 * v) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_add_ps(acc_e[m][v], acc_o[m][v]);
      if (first_block) acc = _mm512_fnmadd_ps(_mm512_set1_ps(xsum[m * groups + g]), z, acc);
      float* yp = a.y + m * a.n + c + 16 * v;
      _mm512_storeu_ps(yp, _mm512_fmadd_ps(s, acc, _mm512_loadu_ps(yp)));
    }
  }
}

template <int M>
TOKENLAB_TARGET_AVX512 void GemvRange(const Args& a, const float* xsum, int64_t c0, int64_t c1) {
  const int64_t groups = a.k / a.group_size;
  const int64_t rows_per_group = a.group_size / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = c0; c < c1; c += 16) _mm512_storeu_ps(a.y + m * a.n + c, _mm512_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t rb = 0; rb < rows_per_group; rb += kRowBlock) {
      const int64_t r0 = g * rows_per_group + rb;
      const int64_t nr = std::min(kRowBlock, rows_per_group - rb);
      const uint8_t* p0 = a.packed + r0 * a.n;
      const float* x0 = a.x + 2 * r0;
      // Column vectors per step: as many as the registers hold (2 * M * NV accumulators).
      constexpr int kNV = M <= 2 ? 4 : 2;
      int64_t c = c0;
      for (; c + 16 * kNV <= c1; c += 16 * kNV) GemvStep<M, kNV>(a, xsum, g, rb == 0, p0, x0, nr, c);
      for (; c < c1; c += 16) GemvStep<M, 1>(a, xsum, g, rb == 0, p0, x0, nr, c);
    }
  }
}

// An MB x 64 register-blocked float kernel over a dequantized slab: y[m, tile] += s * (x[m, slab rows] @ slab).
template <int MB>
TOKENLAB_TARGET_AVX512 inline void SlabMatmul(const Args& a, const float* slab, int64_t rows, int64_t r0,
                                              const __m512 s[4], int64_t m0, int64_t col) {
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_ps();
  const float* xb = a.x + m0 * a.k + r0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* w = slab + r * 64;
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16);
    const __m512 w2 = _mm512_load_ps(w + 32), w3 = _mm512_load_ps(w + 48);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_set1_ps(xb[i * a.k + r]);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xv, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(xv, w3, acc[i][3]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* yr = a.y + (m0 + i) * a.n + col;
    for (int v = 0; v < 4; ++v)
      _mm512_storeu_ps(yr + 16 * v, _mm512_fmadd_ps(s[v], acc[i][v], _mm512_loadu_ps(yr + 16 * v)));
  }
}

}  // namespace

TOKENLAB_TARGET_AVX512 void GemvColumns(const Args& a, const float* xsum, int64_t c0, int64_t c1) {
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

TOKENLAB_TARGET_AVX512 void TiledColumns(const Args& a, int64_t c0, int64_t c1) {
  alignas(64) float slab[kSlabRows * kTile];
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t c = c0; c < c1; c += 16) _mm512_storeu_ps(a.y + m * a.n + c, _mm512_setzero_ps());
  for (int64_t r0 = 0, r1; r0 < a.k; r0 = r1) {
    const int64_t g = r0 / a.group_size;
    r1 = std::min({r0 + kSlabRows, (g + 1) * a.group_size, a.k});
    const int64_t rows = r1 - r0;
    for (int64_t col = c0; col < c1; col += kTile) {
      __m512 s[4], z[4];
      for (int v = 0; v < 4; ++v) {
        s[v] = _mm512_loadu_ps(a.scales + g * a.n + col + 16 * v);
        z[v] = LoadZeros(a, g, col + 16 * v);
      }
      const uint8_t* p = a.packed + (r0 / 2) * a.n + col;
      for (int64_t r = 0; r < rows; r += 2, p += a.n) {
        _mm_prefetch(reinterpret_cast<const char*>(p + 128), _MM_HINT_T0);
        float* dst = slab + r * 64;
        for (int v = 0; v < 4; ++v) {
          __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v)));
          _mm512_store_ps(dst + 16 * v, _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, lo_mask)), z[v]));
          _mm512_store_ps(dst + 64 + 16 * v, _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), z[v]));
        }
      }
      int64_t m0 = 0;
      for (; m0 + 6 <= a.m; m0 += 6) SlabMatmul<6>(a, slab, rows, r0, s, m0, col);
      for (; m0 + 4 <= a.m; m0 += 4) SlabMatmul<4>(a, slab, rows, r0, s, m0, col);
      for (; m0 + 2 <= a.m; m0 += 2) SlabMatmul<2>(a, slab, rows, r0, s, m0, col);
      for (; m0 < a.m; ++m0) SlabMatmul<1>(a, slab, rows, r0, s, m0, col);
    }
  }
}

}  // namespace avx512
}  // namespace int4
}  // namespace tokenlab

#endif  // TOKENLAB_X86
