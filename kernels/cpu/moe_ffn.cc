// Grouped SwiGLU expert FFN (the MoE FFN's "grouped" strategy), as an XLA FFI handler for the CPU.
//
//   for every expert e with rows [o_e, o_e + n_e) of xs:
//     ys[rows] = (silu(xs[rows] @ w_gate[e]) * (xs[rows] @ w_up[e])) @ w_down[e]
//
// xs [R, d] holds the dispatched rows, sorted by expert (group_sizes n_e and group_offsets o_e, [E] int32);
// rows outside every group (padding) get zeros. Each touched expert's weights are read in place from the
// stacked [E, d, f] / [E, f, d] operands (XLA's own grouped loop copies a dynamically indexed expert's weights
// before each GEMM, which at decode doubles the bytes moved); untouched experts are never read.
//
// Two phases, each split over (expert, column chunk) tasks across the caller and XLA's intra-op pool:
//   1. h[rows, chunk of f] = silu(xs[rows] @ w_gate[e][:, chunk]) * (xs[rows] @ w_up[e][:, chunk]);
//   2. ys[rows, chunk of d] = h[rows] @ w_down[e][:, chunk].
// Each product runs over K in blocks of 256, so the weight panel (256 x chunk) stays in L2 while every row block
// of the expert uses it.
// Decode (every expert has at most kStreamMaxRows rows, so the time is the weight read): the same two phases
// split over (expert, K-slab) instead, each task streaming a contiguous slab of whole weight rows in memory
// order (4 rows at a time, the few output rows staying in L1), the slabs' partial sums added afterwards. The register-blocked kernels and a vectorized
// silu are written per instruction set (moe_ffn_{avx512,avx2}.cc, chosen at run time, see isa.h); the scalar
// path runs anywhere (aarch64 included: it has no NEON path yet).
#include "moe_ffn.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tokenlab {
namespace moe {

void ScalarGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1, bool accumulate) {
  for (int64_t m = 0; m < g.m; ++m) {
    float* crow = g.c + m * g.ldc;
    if (!accumulate)
      for (int64_t c = c0; c < c1; ++c) crow[c] = 0.f;
    for (int64_t k = k0; k < k1; ++k) {
      const float x = g.a[m * g.lda + k];
      const float* brow = g.b + k * g.ldb;
      for (int64_t c = c0; c < c1; ++c) crow[c] += x * brow[c];
    }
  }
}

void ScalarStreamGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1) {
  ScalarGemm(g, k0, k1, c0, c1, false);
}

void ScalarSiluMul(float* h, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = h[i];
    const float t = std::exp(-std::fabs(x));  // no overflow on either side
    const float sig = x >= 0.f ? 1.f / (1.f + t) : t / (1.f + t);
    h[i] = x * sig * u[i];
  }
}

namespace {

struct Path {
  void (*gemm)(const Gemm&, int64_t, int64_t, int64_t, int64_t, bool) = ScalarGemm;
  void (*stream)(const Gemm&, int64_t, int64_t, int64_t, int64_t) = ScalarStreamGemm;
  void (*silu_mul)(float*, const float*, int64_t) = ScalarSiluMul;
};

Path PathFor(Isa isa) {
  switch (isa) {
#if defined(TOKENLAB_X86)
    case Isa::kAvx512: return {avx512::BlockGemm, avx512::StreamGemm, avx512::SiluMul};
    case Isa::kAvx2: return {avx2::BlockGemm, avx2::StreamGemm, avx2::SiluMul};
#endif
    default: return {};
  }
}

// C[:, 0:w] = A[:, 0:K] @ B[0:K, 0:w], K-blocked (see the top of this file).
void Product(const Path& p, const Gemm& g, int64_t k, int64_t w) {
  if (k == 0) {
    p.gemm(g, 0, 0, 0, w, false);
    return;
  }
  constexpr int64_t kb = 256;
  for (int64_t k0 = 0; k0 < k; k0 += kb) p.gemm(g, k0, std::min(k, k0 + kb), 0, w, k0 > 0);
}

// Columns per task: 256 for a few rows, 128 for more, halved (down to 32) until there are >= 4 tasks per thread.
int64_t ChunkColumns(int64_t n, int64_t experts, int64_t max_rows, int64_t threads) {
  int64_t chunk = max_rows <= 4 ? 256 : 128;
  while (chunk > 32 && experts * ((n + chunk - 1) / chunk) < 4 * threads) chunk /= 2;
  return chunk;
}

// Decode: K-slabs per expert, enough for ~8 tasks per thread, each at least 64 weight rows.
int64_t Slabs(int64_t k, int64_t experts, int64_t threads) {
  return std::max<int64_t>(1, std::min((8 * threads + experts - 1) / experts, k / 64));
}

// Decode: part[s][rows of e][0:n] = A[rows of e, slab s] @ B_e[slab s, 0:n] for every (active expert, slab),
// each weight slab (contiguous rows of B_e) streamed once in memory order.
void StreamPartials(ffi::ThreadPool& pool, const Path& p, const std::vector<int64_t>& active,
                    const int32_t* sizes, const int32_t* offsets, int64_t rows, const float* a, int64_t lda,
                    const float* b, int64_t k, int64_t n, int64_t slabs, float* part) {
  const int64_t slab_rows = (k + slabs - 1) / slabs;
  ParallelFor(pool, static_cast<int64_t>(active.size()) * slabs, [&](int64_t t) {
    const int64_t e = active[t / slabs], s = t % slabs;
    const int64_t k0 = std::min(k, s * slab_rows), k1 = std::min(k, k0 + slab_rows);
    const int64_t m = sizes[e], o = offsets[e];
    p.stream(Gemm{a + o * lda, lda, b + e * k * n, n, part + (s * rows + o) * n, n, m}, k0, k1, 0, n);
  });
}

// Decode: part[0][r] += part[s][r] for s > 0, over the rows of the active experts.
void SumSlabs(const std::vector<int64_t>& active, const int32_t* sizes, const int32_t* offsets, int64_t rows,
              int64_t n, int64_t slabs, float* part) {
  for (int64_t e : active)
    for (int64_t r = offsets[e]; r < offsets[e] + sizes[e]; ++r)
      for (int64_t s = 1; s < slabs; ++s) {
        const float* src = part + (s * rows + r) * n;
        float* dst = part + r * n;
        for (int64_t c = 0; c < n; ++c) dst[c] += src[c];
      }
}

std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error Err(const std::string& what) { return ffi::Error::InvalidArgument("tokenlab_moe_ffn: " + what); }

ffi::Error MoeFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::S32> group_sizes,
                      ffi::Buffer<ffi::S32> group_offsets, ffi::Buffer<ffi::F32> w_gate,
                      ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down, ffi::ResultBuffer<ffi::F32> ys,
                      int64_t isa) {
  auto xd = xs.dimensions(), sd = group_sizes.dimensions(), od = group_offsets.dimensions();
  auto gd = w_gate.dimensions(), ud = w_up.dimensions(), dd = w_down.dimensions(), yd = ys->dimensions();
  if (xd.size() != 2) return Err("xs must be [R, d]; got " + Dims(xd));
  const int64_t rows = xd[0], d = xd[1];
  if (gd.size() != 3 || gd[1] != d) return Err("w_gate must be [E, d=" + std::to_string(d) + ", f]; got " + Dims(gd));
  const int64_t experts = gd[0], f = gd[2];
  if (ud.size() != 3 || ud[0] != experts || ud[1] != d || ud[2] != f)
    return Err("w_up must be w_gate's shape " + Dims(gd) + "; got " + Dims(ud));
  if (dd.size() != 3 || dd[0] != experts || dd[1] != f || dd[2] != d)
    return Err("w_down must be [E=" + std::to_string(experts) + ", f=" + std::to_string(f) +
               ", d=" + std::to_string(d) + "]; got " + Dims(dd));
  if (sd.size() != 1 || sd[0] != experts || od.size() != 1 || od[0] != experts)
    return Err("group_sizes and group_offsets must be [E=" + std::to_string(experts) + "]; got " + Dims(sd) +
               " and " + Dims(od));
  if (yd.size() != 2 || yd[0] != rows || yd[1] != d) return Err("the output must be [R, d] = " + Dims(xd));
  bool isa_ok;
  const Path path = PathFor(ResolveIsa(isa, &isa_ok));
  if (!isa_ok) return Err("isa=" + std::to_string(isa) + " is not an instruction-set path this CPU runs");

  // Groups: within [0, R), disjoint (so their sizes sum to at most R); every other row is padding.
  const int32_t* sizes = group_sizes.typed_data();
  const int32_t* offsets = group_offsets.typed_data();
  std::vector<uint8_t> covered(rows, 0);
  std::vector<int64_t> active;
  int64_t max_rows = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t n = sizes[e], o = offsets[e];
    if (n < 0 || o < 0 || o + n > rows)
      return Err("expert " + std::to_string(e) + " has group_offsets=" + std::to_string(o) +
                 ", group_sizes=" + std::to_string(n) + "; a group must lie within the R=" +
                 std::to_string(rows) + " rows of xs");
    for (int64_t r = o; r < o + n; ++r) {
      if (covered[r])
        return Err("row " + std::to_string(r) + " belongs to two groups (expert " + std::to_string(e) +
                   "); groups must be disjoint");
      covered[r] = 1;
    }
    if (n > 0) {
      active.push_back(e);
      max_rows = std::max(max_rows, n);
    }
  }
  float* y = ys->typed_data();
  for (int64_t r = 0; r < rows; ++r)
    if (!covered[r]) std::memset(y + r * d, 0, sizeof(float) * d);
  if (active.empty() || d == 0) return ffi::Error::Success();

  const float* x = xs.typed_data();
  const float *wg = w_gate.typed_data(), *wu = w_up.typed_data(), *wd = w_down.typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t n_active = static_cast<int64_t>(active.size());

  if (max_rows <= kStreamMaxRows) {
    // Decode: every expert has a few rows; the weights are streamed in K-slabs (see the top of this file).
    const int64_t s1 = Slabs(d, n_active, threads), s2 = Slabs(f, n_active, threads);
    std::unique_ptr<float[]> g(new float[std::max<int64_t>(1, s1 * rows * f)]);
    std::unique_ptr<float[]> u(new float[std::max<int64_t>(1, s1 * rows * f)]);
    StreamPartials(pool, path, active, sizes, offsets, rows, x, d, wg, d, f, s1, g.get());
    StreamPartials(pool, path, active, sizes, offsets, rows, x, d, wu, d, f, s1, u.get());
    SumSlabs(active, sizes, offsets, rows, f, s1, g.get());
    SumSlabs(active, sizes, offsets, rows, f, s1, u.get());
    for (int64_t e : active)
      for (int64_t r = offsets[e]; r < offsets[e] + sizes[e]; ++r) path.silu_mul(g.get() + r * f, u.get() + r * f, f);
    if (s2 == 1) {
      StreamPartials(pool, path, active, sizes, offsets, rows, g.get(), f, wd, f, d, 1, y);
      return ffi::Error::Success();
    }
    std::unique_ptr<float[]> part(new float[s2 * rows * d]);
    StreamPartials(pool, path, active, sizes, offsets, rows, g.get(), f, wd, f, d, s2, part.get());
    SumSlabs(active, sizes, offsets, rows, d, s2, part.get());
    for (int64_t e : active)
      std::memcpy(y + offsets[e] * d, part.get() + offsets[e] * d, sizeof(float) * sizes[e] * d);
    return ffi::Error::Success();
  }

  std::unique_ptr<float[]> h(new float[std::max<int64_t>(1, rows * f)]);

  // Phase 1: h = silu(xs @ w_gate) * (xs @ w_up), per (expert, chunk of f).
  if (f > 0) {
    const int64_t chunk = ChunkColumns(f, n_active, max_rows, threads);
    const int64_t per_expert = (f + chunk - 1) / chunk;
    ParallelFor(pool, n_active * per_expert, [&](int64_t t) {
      const int64_t e = active[t / per_expert], c0 = (t % per_expert) * chunk, w = std::min(chunk, f - c0);
      const int64_t m = sizes[e], o = offsets[e];
      std::vector<float> u(m * w);
      const float* a = x + o * d;
      Product(path, Gemm{a, d, wg + e * d * f + c0, f, h.get() + o * f + c0, f, m}, d, w);
      Product(path, Gemm{a, d, wu + e * d * f + c0, f, u.data(), w, m}, d, w);
      for (int64_t i = 0; i < m; ++i) path.silu_mul(h.get() + (o + i) * f + c0, u.data() + i * w, w);
    });
  }
  // Phase 2: ys = h @ w_down, per (expert, chunk of d).
  const int64_t chunk = ChunkColumns(d, n_active, max_rows, threads);
  const int64_t per_expert = (d + chunk - 1) / chunk;
  ParallelFor(pool, n_active * per_expert, [&](int64_t t) {
    const int64_t e = active[t / per_expert], c0 = (t % per_expert) * chunk, w = std::min(chunk, d - c0);
    const int64_t m = sizes[e], o = offsets[e];
    Product(path, Gemm{h.get() + o * f, f, wd + e * f * d + c0, d, y + o * d + c0, d, m}, f, w);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace moe
}  // namespace tokenlab

// The library is built with hidden visibility; only the handlers are exported.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(TokenlabMoeFfn, tokenlab::moe::MoeFfnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // xs [R, d], rows sorted by expert
                                  .Arg<ffi::Buffer<ffi::S32>>()   // group_sizes [E]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // group_offsets [E]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_gate [E, d, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_up [E, d, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_down [E, f, d]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ys [R, d]
                                  .Attr<int64_t>("isa"));         // -1: the process-wide path; else that Isa
#pragma GCC visibility pop
