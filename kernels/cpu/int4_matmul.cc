// INT4 dequant-matmul on the packed Int4Weight layout, as an XLA FFI handler for the CPU.
//
//   y[m, n] = sum_r x[m, r] * s[g(r), n] * (q[r, n] - z[g(r), n]),   g(r) = r / group_size
//
// x is already permuted (act-order) and divided by the AWQ activation scales by the caller. packed is
// [K/2, N] uint8: the low nibble of packed[i, n] is q[2i, n], the high nibble q[2i+1, n]; N is contiguous.
//
// Two paths, chosen by M:
// - matrix-vector (M <= kGemvMaxM): each packed byte row is loaded once per column tile, split into its two
//   nibble planes, converted to float and multiplied by x's two rows of broadcast activations; the group's
//   scale and zero are applied once per group to the small partial sums (sum x*q), using
//   s * (sum x q - z * sum x), so no per-weight scale multiply is done.
// - tiled (larger M): a group's slab of one column tile is dequantized once to (q - z) in a small float
//   buffer that stays in L1, and an M-block x N-tile register-blocked float kernel runs over it.
// Work is split over column tiles across the caller and XLA's intra-op thread pool.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TOKENLAB_AVX512 1
#endif

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tokenlab {
namespace {

constexpr int64_t kGemvMaxM = 4;
constexpr int64_t kSlabRows = 64;  // rows of a dequantized slab (tiled path): 64 x 64 floats = 16 KiB, in L1

struct Int4Args {
  const float* x;
  const uint8_t* packed;
  const float* scales;
  const uint8_t* zeros;  // [G, N], or nullptr when symmetric
  float sym_zero;
  float* y;
  int64_t m, k, n, group_size;
};

inline float ZeroAt(const Int4Args& a, int64_t g, int64_t col) {
  return a.zeros ? static_cast<float>(a.zeros[g * a.n + col]) : a.sym_zero;
}

// Portable scalar path, for any CPU; also the tail (N % 16 columns) of the SIMD paths.
void ScalarColumns(const Int4Args& a, int64_t c0, int64_t c1) {
  const int64_t groups = a.k / a.group_size;
  std::vector<float> part(c1 - c0);
  for (int64_t mi = 0; mi < a.m; ++mi) {
    const float* xr = a.x + mi * a.k;
    float* yr = a.y + mi * a.n;
    for (int64_t c = c0; c < c1; ++c) yr[c] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      std::fill(part.begin(), part.end(), 0.f);
      float xsum = 0.f;
      for (int64_t r = g * a.group_size; r < (g + 1) * a.group_size; r += 2) {
        const uint8_t* row = a.packed + (r / 2) * a.n;
        const float xe = xr[r], xo = xr[r + 1];
        xsum += xe + xo;
        for (int64_t c = c0; c < c1; ++c) {
          const uint8_t b = row[c];
          part[c - c0] += xe * static_cast<float>(b & 0xF) + xo * static_cast<float>(b >> 4);
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        const float s = a.scales[g * a.n + c];
        yr[c] += s * (part[c - c0] - ZeroAt(a, g, c) * xsum);
      }
    }
  }
}

#ifdef TOKENLAB_AVX512

// Sum of x over each group, [M, G]: the zero-point term of the matrix-vector path.
std::vector<float> GroupSums(const Int4Args& a) {
  const int64_t groups = a.k / a.group_size;
  std::vector<float> out(a.m * groups);
  for (int64_t mi = 0; mi < a.m; ++mi)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t r = g * a.group_size; r < (g + 1) * a.group_size; ++r) s += a.x[mi * a.k + r];
      out[mi * groups + g] = s;
    }
  return out;
}

inline __m512 LoadZeros(const Int4Args& a, int64_t g, int64_t col) {
  if (!a.zeros) return _mm512_set1_ps(a.sym_zero);
  __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zeros + g * a.n + col));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z));
}

// Matrix-vector path. Rows are swept in blocks of kRowBlock packed rows across a column range [c0, c1): each
// block reads kRowBlock short sequential streams (one per packed row), which the hardware prefetchers follow,
// instead of walking one narrow column tile down all K rows (a new 4 KiB page, and a TLB miss, every row).
// The block's partial sums stay in registers; y[m, cols] += s * partial, and the zero-point term
// -s * z * sum(x over the group) is added with the group's first block.
constexpr int64_t kRowBlock = 8;

template <int M, int NV>
inline void GemvStep(const Int4Args& a, const float* xsum, int64_t g, bool first_block, const uint8_t* p0,
                     const float* x0, int64_t nr, int64_t c) {
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
void GemvRange(const Int4Args& a, const float* xsum, int64_t c0, int64_t c1) {
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

void GemvColumns(const Int4Args& a, const float* xsum, int64_t c0, int64_t c1) {
  Int4Args b = a;
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

// Tiled path: for each slab of up to kSlabRows rows (never crossing a group) and each 64-column tile of the
// range, dequantize the slab to (q - z) in an L1-resident buffer, then run an MB x 64 register-blocked float
// kernel over every row of x: y[m, tile] += s * (x[m, slab rows] @ buffer).
template <int MB>
inline void SlabMatmul(const Int4Args& a, const float* slab, int64_t rows, int64_t r0, const __m512 s[4],
                       int64_t m0, int64_t col) {
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

void TiledColumns(const Int4Args& a, int64_t c0, int64_t c1) {
  alignas(64) float slab[kSlabRows * 64];
  const __m512i lo_mask = _mm512_set1_epi32(0xF);
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t c = c0; c < c1; c += 16) _mm512_storeu_ps(a.y + m * a.n + c, _mm512_setzero_ps());
  for (int64_t r0 = 0, r1; r0 < a.k; r0 = r1) {
    const int64_t g = r0 / a.group_size;
    r1 = std::min({r0 + kSlabRows, (g + 1) * a.group_size, a.k});
    const int64_t rows = r1 - r0;
    for (int64_t col = c0; col < c1; col += 64) {
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

#endif  // TOKENLAB_AVX512

ffi::Error Int4MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                          ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::U8> zeros,
                          ffi::ResultBuffer<ffi::F32> y, int64_t group_size, int64_t sym_zero,
                          int64_t simd) {
  auto xd = x.dimensions(), pd = packed.dimensions(), sd = scales.dimensions(), zd = zeros.dimensions();
  if (xd.size() != 2 || pd.size() != 2 || sd.size() != 2 || zd.size() != 2)
    return ffi::Error::InvalidArgument("tokenlab_int4_matmul: x, packed, scales and zeros must be 2-D");
  const int64_t m = xd[0], k = xd[1], n = pd[1];
  if (pd[0] * 2 != k)
    return ffi::Error::InvalidArgument("tokenlab_int4_matmul: packed has " + std::to_string(pd[0]) +
                                       " rows; expected K/2 = " + std::to_string(k / 2) +
                                       " for x's K=" + std::to_string(k));
  if (group_size < 2 || group_size % 2 || k % group_size)
    return ffi::Error::InvalidArgument("tokenlab_int4_matmul: group_size=" + std::to_string(group_size) +
                                       " must be even and divide K=" + std::to_string(k));
  const int64_t groups = k / group_size;
  if (sd[0] != groups || sd[1] != n)
    return ffi::Error::InvalidArgument("tokenlab_int4_matmul: scales must be [G=" + std::to_string(groups) +
                                       ", N=" + std::to_string(n) + "]");
  const bool asym = sym_zero < 0;
  if (asym && (zd[0] != groups || zd[1] != n))
    return ffi::Error::InvalidArgument("tokenlab_int4_matmul: zeros must be [G=" + std::to_string(groups) +
                                       ", N=" + std::to_string(n) + "]");
  auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != m || yd[1] != n)
    return ffi::Error::InvalidArgument("tokenlab_int4_matmul: output must be [M, N]");
  Int4Args a{x.typed_data(), packed.typed_data(), scales.typed_data(), asym ? zeros.typed_data() : nullptr,
             static_cast<float>(asym ? 0 : sym_zero), y->typed_data(), m, k, n, group_size};
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(a.y, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }

  int64_t simd_cols = 0;
#ifdef TOKENLAB_AVX512
  if (simd) simd_cols = n / 16 * 16;
#endif
  // Threads split the columns into chunks (several per thread, for balance on a shared machine).
#ifdef TOKENLAB_AVX512
  if (simd_cols) {
    const bool gemv = m <= kGemvMaxM;
    const int64_t unit = gemv ? 16 : 64;  // columns per vector step of the path
    const int64_t work_cols = gemv ? simd_cols : simd_cols / 64 * 64;
    const int64_t threads = std::max<int64_t>(1, pool.num_threads());
    int64_t chunk = (work_cols / unit + 4 * threads - 1) / (4 * threads) * unit;
    chunk = std::max(chunk, std::min<int64_t>(work_cols, 256));
    const int64_t chunks = work_cols ? (work_cols + chunk - 1) / chunk : 0;
    std::vector<float> xsum = GroupSums(a);
    ParallelFor(pool, chunks, [&](int64_t t) {
      const int64_t c0 = t * chunk, c1 = std::min(work_cols, c0 + chunk);
      if (gemv) GemvColumns(a, xsum.data(), c0, c1);
      else TiledColumns(a, c0, c1);
    });
    if (work_cols < simd_cols) GemvColumns(a, xsum.data(), work_cols, simd_cols);
  }
#endif
  if (simd_cols < n) {
    const int64_t chunk = 64, c0 = simd_cols, chunks = (n - c0 + chunk - 1) / chunk;
    ParallelFor(pool, chunks, [&](int64_t t) {
      ScalarColumns(a, c0 + t * chunk, std::min(n, c0 + (t + 1) * chunk));
    });
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace tokenlab

// The library is built with hidden visibility; only the handlers are exported.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(TokenlabInt4Matmul, tokenlab::Int4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // packed [K/2, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scales [G, N]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // zeros [G, N] (or [1, 1] if symmetric)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [M, N]
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("sym_zero")      // the implicit zero, or -1: use zeros
                                  .Attr<int64_t>("simd"));        // 0 forces the portable scalar path
#pragma GCC visibility pop
