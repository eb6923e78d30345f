// INT4 dequant-matmul on the packed Int4Weight layout, as an XLA FFI handler for the CPU.
//
//   y[m, n] = sum_r x[m, r] * s[g(r), n] * (q[r, n] - z[g(r), n]),   g(r) = r / group_size
//
// x is already permuted (act-order) and divided by the AWQ activation scales by the caller. packed is
// [K/2, N] uint8: the low nibble of packed[i, n] is q[2i, n], the high nibble q[2i+1, n]; N is contiguous.
//
// Two algorithms, chosen by M, each written once per instruction set (int4_matmul_{avx512,avx2,neon}.cc; the
// path is chosen at run time, see isa.h):
// - matrix-vector (M <= kGemvMaxM): each packed byte row is loaded once per column tile, split into its two
//   nibble planes, converted to float and multiplied by x's two rows of broadcast activations; the group's
//   scale and zero are applied once per group to the small partial sums (sum x*q), using
//   s * (sum x q - z * sum x), so no per-weight scale multiply is done.
// - tiled (larger M; x86 paths): a group's slab of one column tile is dequantized once to (q - z) in a small
//   float buffer that stays in L1, and an M-block x N-strip register-blocked float kernel runs over it.
// Work is split over column tiles across the caller and XLA's intra-op thread pool.
#include "int4_matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tokenlab {
namespace int4 {

void ScalarColumns(const Args& a, int64_t c0, int64_t c1) {
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

namespace {

// Sum of x over each group, [M, G]: the zero-point term of the matrix-vector path.
std::vector<float> GroupSums(const Args& a) {
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

// One instruction set's entry points; lanes == 0 means the scalar path only.
struct Path {
  int64_t lanes = 0;
  void (*gemv)(const Args&, const float*, int64_t, int64_t) = nullptr;
  void (*tiled)(const Args&, int64_t, int64_t) = nullptr;  // nullptr: the matrix-vector path for every M
};

Path PathFor(Isa isa) {
  switch (isa) {
#if defined(TOKENLAB_X86)
    case Isa::kAvx512: return {avx512::kLanes, avx512::GemvColumns, avx512::TiledColumns};
    case Isa::kAvx2: return {avx2::kLanes, avx2::GemvColumns, avx2::TiledColumns};
#endif
#if defined(TOKENLAB_NEON)
    case Isa::kNeon: return {neon::kLanes, neon::GemvColumns, nullptr};
#endif
    default: return {};
  }
}

ffi::Error Int4MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                          ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::U8> zeros,
                          ffi::ResultBuffer<ffi::F32> y, int64_t group_size, int64_t sym_zero,
                          int64_t isa) {
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
  bool isa_ok;
  const Path path = PathFor(ResolveIsa(isa, &isa_ok));
  if (!isa_ok)
    return ffi::Error::InvalidArgument("tokenlab_int4_matmul: isa=" + std::to_string(isa) +
                                       " is not an instruction-set path this CPU runs");
  Args a{x.typed_data(), packed.typed_data(), scales.typed_data(), asym ? zeros.typed_data() : nullptr,
             static_cast<float>(asym ? 0 : sym_zero), y->typed_data(), m, k, n, group_size};
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(a.y, 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }

  const int64_t simd_cols = path.lanes ? n / path.lanes * path.lanes : 0;
  // Threads split the columns into chunks (several per thread, for balance on a shared machine).
  if (simd_cols) {
    const bool gemv = m <= kGemvMaxM || path.tiled == nullptr;
    const int64_t unit = gemv ? path.lanes : kTile;  // columns per vector step of the algorithm
    const int64_t work_cols = gemv ? simd_cols : simd_cols / kTile * kTile;
    const int64_t threads = std::max<int64_t>(1, pool.num_threads());
    int64_t chunk = (work_cols / unit + 4 * threads - 1) / (4 * threads) * unit;
    chunk = std::max(chunk, std::min<int64_t>(work_cols, 256));
    const int64_t chunks = work_cols ? (work_cols + chunk - 1) / chunk : 0;
    std::vector<float> xsum = GroupSums(a);
    ParallelFor(pool, chunks, [&](int64_t t) {
      const int64_t c0 = t * chunk, c1 = std::min(work_cols, c0 + chunk);
      if (gemv) path.gemv(a, xsum.data(), c0, c1);
      else path.tiled(a, c0, c1);
    });
    if (work_cols < simd_cols) path.gemv(a, xsum.data(), work_cols, simd_cols);
  }
  if (simd_cols < n) {
    const int64_t chunk = 64, c0 = simd_cols, chunks = (n - c0 + chunk - 1) / chunk;
    ParallelFor(pool, chunks, [&](int64_t t) {
      ScalarColumns(a, c0 + t * chunk, std::min(n, c0 + (t + 1) * chunk));
    });
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace int4
}  // namespace tokenlab

// The library is built with hidden visibility; only the handlers are exported.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(TokenlabInt4Matmul, tokenlab::int4::Int4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // packed [K/2, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scales [G, N]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // zeros [G, N] (or [1, 1] if symmetric)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [M, N]
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("sym_zero")      // the implicit zero, or -1: use zeros
                                  .Attr<int64_t>("isa"));         // -1: the process-wide path; else that Isa
#pragma GCC visibility pop
