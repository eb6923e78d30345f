// INT4 dequant-matmul, NEON path (aarch64): 4 columns per vector, the matrix-vector algorithm of
// int4_matmul.cc for every M (rows of x in blocks of up to 4). NEON is part of the aarch64 baseline.
#include <algorithm>
#include <cstdint>

#include "int4_matmul.h"

#if defined(TOKENLAB_NEON)

namespace tokenlab {
namespace int4 {
namespace neon {
namespace {

// 8 packed bytes -> their low and high nibbles as two pairs of float vectors (columns 0-3 and 4-7).
inline void Nibbles(const uint8_t* p, float32x4_t lo[2], float32x4_t hi[2]) {
  const uint8x8_t b = vld1_u8(p);
  const uint16x8_t l = vmovl_u8(vand_u8(b, vdup_n_u8(0xF)));
  const uint16x8_t h = vmovl_u8(vshr_n_u8(b, 4));
  lo[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(l)));
  lo[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(l)));
  hi[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(h)));
  hi[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(h)));
}

inline float32x4_t LoadZeros(const Args& a, int64_t g, int64_t col) {
  if (!a.zeros) return vdupq_n_f32(a.sym_zero);
  const uint8_t* z = a.zeros + g * a.n + col;
  const uint32_t v[4] = {z[0], z[1], z[2], z[3]};
  return vcvtq_f32_u32(vld1q_u32(v));
}

// kRowBlock packed rows x 8 columns (two vectors) for M rows of x, as the x86 paths do with wider vectors.
template <int M>
inline void GemvStep8(const Args& a, const float* xsum, int64_t g, bool first_block, const uint8_t* p0,
                      const float* x0, int64_t nr, int64_t c) {
  const int64_t groups = a.k / a.group_size;
  float32x4_t acc_e[M][2], acc_o[M][2];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < 2; ++v) acc_e[m][v] = acc_o[m][v] = vdupq_n_f32(0.f);
  for (int64_t r = 0; r < nr; ++r) {
    float32x4_t lo[2], hi[2];
    Nibbles(p0 + r * a.n + c, lo, hi);
    for (int m = 0; m < M; ++m) {
      const float xe = x0[m * a.k + 2 * r], xo = x0[m * a.k + 2 * r + 1];
      for (int v = 0; v < 2; ++v) {
        acc_e[m][v] = vfmaq_n_f32(acc_e[m][v], lo[v], xe);
        acc_o[m][v] = vfmaq_n_f32(acc_o[m][v], hi[v], xo);
      }
    }
  }
  for (int v = 0; v < 2; ++v) {
    const float32x4_t s = vld1q_f32(a.scales + g * a.n + c + 4 * v);
    const float32x4_t z = first_block ? LoadZeros(a, g, c + 4 * v) : vdupq_n_f32(0.f);
    for (int m = 0; m < M; ++m) {
      float32x4_t acc = vaddq_f32(acc_e[m][v], acc_o[m][v]);
      if (first_block) acc = vfmsq_n_f32(acc, z, xsum[m * groups + g]);
      float* yp = a.y + m * a.n + c + 4 * v;
      vst1q_f32(yp, vfmaq_f32(vld1q_f32(yp), s, acc));
    }
  }
}

// The last 4 columns of a range whose width is not a multiple of 8.
template <int M>
inline void GemvStep4(const Args& a, const float* xsum, int64_t g, bool first_block, const uint8_t* p0,
                      const float* x0, int64_t nr, int64_t c) {
  const int64_t groups = a.k / a.group_size;
  float32x4_t acc[M];
  for (int m = 0; m < M; ++m) acc[m] = vdupq_n_f32(0.f);
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* p = p0 + r * a.n + c;
    const uint32_t b[4] = {p[0], p[1], p[2], p[3]};
    const uint32x4_t bv = vld1q_u32(b);
    const float32x4_t lo = vcvtq_f32_u32(vandq_u32(bv, vdupq_n_u32(0xF)));
    const float32x4_t hi = vcvtq_f32_u32(vshrq_n_u32(bv, 4));
    for (int m = 0; m < M; ++m) {
      acc[m] = vfmaq_n_f32(acc[m], lo, x0[m * a.k + 2 * r]);
      acc[m] = vfmaq_n_f32(acc[m], hi, x0[m * a.k + 2 * r + 1]);
    }
  }
  const float32x4_t s = vld1q_f32(a.scales + g * a.n + c);
  const float32x4_t z = first_block ? LoadZeros(a, g, c) : vdupq_n_f32(0.f);
  for (int m = 0; m < M; ++m) {
    float32x4_t t = acc[m];
    if (first_block) t = vfmsq_n_f32(t, z, xsum[m * groups + g]);
    float* yp = a.y + m * a.n + c;
    vst1q_f32(yp, vfmaq_f32(vld1q_f32(yp), s, t));
  }
}

template <int M>
void GemvRange(const Args& a, const float* xsum, int64_t c0, int64_t c1) {
  const int64_t groups = a.k / a.group_size;
  const int64_t rows_per_group = a.group_size / 2;
  for (int64_t m = 0; m < M; ++m) std::fill(a.y + m * a.n + c0, a.y + m * a.n + c1, 0.f);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t rb = 0; rb < rows_per_group; rb += kRowBlock) {
      const int64_t r0 = g * rows_per_group + rb;
      const int64_t nr = std::min(kRowBlock, rows_per_group - rb);
      const uint8_t* p0 = a.packed + r0 * a.n;
      const float* x0 = a.x + 2 * r0;
      int64_t c = c0;
      for (; c + 8 <= c1; c += 8) GemvStep8<M>(a, xsum, g, rb == 0, p0, x0, nr, c);
      for (; c < c1; c += 4) GemvStep4<M>(a, xsum, g, rb == 0, p0, x0, nr, c);
    }
  }
}

}  // namespace

void GemvColumns(const Args& a, const float* xsum, int64_t c0, int64_t c1) {
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

}  // namespace neon
}  // namespace int4
}  // namespace tokenlab

#endif  // TOKENLAB_NEON
