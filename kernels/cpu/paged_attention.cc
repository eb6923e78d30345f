// Paged decode attention (one query per sequence, at position kv_len - 1) as an XLA FFI handler for the CPU.
//
// For sequence b, query head h and its kv head kh = h / G (G = H / K):
//   logit[j] = scale * q[b, h] . k[j, kh]; soft cap; + alibi[h] * (j - pos); keep j in (pos - W, pos]
//   out[b, h] = softmax(logit) . v[:, kh]        (online softmax, float32; no keys -> zeros)
// Pages are NHD, [P, S, K, D]; page i of sequence b is block_tables[b, i]. Entries past the pages a sequence
// covers are never read. A covered entry outside [0, P), or kv_len outside [0, max_pages * S], is an error.
//
// Work unit: (sequence, context split). A unit walks its pages once; for each page (read front to back, a
// contiguous [S, K, D] block, so the prefetchers and the TLB see whole pages) it visits every kv head, reading
// that head's [S, D] slice of K and V exactly once for its G query heads, and keeps the running max, sum and
// output of all H heads. The context is split so that every thread gets several units, and the parts are
// merged by log-sum-exp. (Walking one kv head at a time across all pages instead — 512-byte pieces at a 4 KiB
// stride — ran at about a third of the bandwidth: a TLB miss per piece.)
//
// The key chunks are written once per instruction set (paged_attention_{avx512,avx2,neon}.cc, chosen at run
// time, see isa.h) beside the portable scalar path below.
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tokenlab {
namespace decode {
namespace {

inline void KeyRange(const Args& a, int64_t b, int64_t* lo, int64_t* hi) {
  const int64_t n = a.lens[b];
  *hi = n;
  *lo = (a.window > 0) ? std::max<int64_t>(0, n - a.window) : 0;
}

// Portable path: one key at a time, for one kv head.
void ScalarUnit(const Args& a, int64_t b, int64_t kv, int64_t j0, int64_t j1, Partial st) {
  const int64_t pos = a.lens[b] - 1;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t page = a.bt[b * a.max_pages + j / a.s];
    const int64_t off = ((page * a.s + j % a.s) * a.kh + kv) * a.d;
    const float* kr = a.kp + off;
    const float* vr = a.vp + off;
    for (int64_t g = 0; g < a.g; ++g) {
      const int64_t h = kv * a.g + g;
      const float* qr = a.q + (b * a.h + h) * a.d;
      float dot = 0.f;
      for (int64_t i = 0; i < a.d; ++i) dot += qr[i] * kr[i];
      float x = dot * a.scale;
      if (a.soft_cap > 0.f) x = a.soft_cap * std::tanh(x / a.soft_cap);
      if (a.slopes) x += a.slopes[h] * static_cast<float>(j - pos);
      // A NaN logit makes the head's output NaN, as in the reference (std::max alone would drop it).
      const float m_new = std::isnan(x) ? x : std::max(st.m[g], x);
      const float corr = std::exp(st.m[g] - m_new);  // exp(-inf) = 0 on the first key
      const float pr = std::exp(x - m_new);
      st.l[g] = st.l[g] * corr + pr;
      float* acc = st.acc + g * a.d;
      for (int64_t i = 0; i < a.d; ++i) acc[i] = acc[i] * corr + pr * vr[i];
      st.m[g] = m_new;
    }
  }
}

using RangeFn = void (*)(const Args&, int64_t, int64_t, int64_t, float*);

// The chunk walker of an instruction set, or of the next lower one whose lanes divide D (an AVX-512 CPU also
// runs the AVX2 path), or ScalarRange.
RangeFn RangeFor(Isa isa, int64_t d) {
  switch (isa) {
#if defined(TOKENLAB_X86)
    case Isa::kAvx512:
      if (d % avx512::kLanes == 0) return avx512::Range;
      [[fallthrough]];
    case Isa::kAvx2: return d % avx2::kLanes == 0 ? avx2::Range : ScalarRange;
#endif
#if defined(TOKENLAB_NEON)
    case Isa::kNeon: return d % neon::kLanes == 0 ? neon::Range : ScalarRange;
#endif
    default: return ScalarRange;
  }
}

}  // namespace

void ScalarRange(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
  for (int64_t kv = 0; kv < a.kh; ++kv) ScalarUnit(a, b, kv, j0, j1, StateAt(a, unit_state, kv));
}

namespace {

ffi::Error PagedDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                           ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> kv_lens,
                           ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::F32> alibi_slopes,
                           ffi::ResultBuffer<ffi::F32> out, float scale, float soft_cap, int64_t sliding_window,
                           int64_t has_alibi, int64_t isa) {
  const std::string name = "tokenlab_paged_decode: ";
  auto qd = q.dimensions(), kd = k_pages.dimensions(), vd = v_pages.dimensions();
  auto ld = kv_lens.dimensions(), bd = block_tables.dimensions();
  if (qd.size() != 3) return ffi::Error::InvalidArgument(name + "q must be [B, H, D]");
  if (kd.size() != 4) return ffi::Error::InvalidArgument(name + "k_pages must be [P, S, K, D]");
  if (vd.size() != 4 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3])
    return ffi::Error::InvalidArgument(name + "v_pages must have k_pages' shape");
  Args a{};
  a.b = qd[0], a.h = qd[1], a.d = qd[2];
  a.p = kd[0], a.s = kd[1], a.kh = kd[2];
  if (kd[3] != a.d) return ffi::Error::InvalidArgument(name + "k_pages head dim must equal q's");
  if (a.kh < 1 || a.h % a.kh)
    return ffi::Error::InvalidArgument(name + "num_q_heads=" + std::to_string(a.h) +
                                       " must be a multiple of num_kv_heads=" + std::to_string(a.kh));
  if (ld.size() != 1 || ld[0] != a.b) return ffi::Error::InvalidArgument(name + "kv_lens must be [B]");
  if (bd.size() != 2 || bd[0] != a.b) return ffi::Error::InvalidArgument(name + "block_tables must be [B, max_pages]");
  if (static_cast<int64_t>(alibi_slopes.element_count()) != a.h) return ffi::Error::InvalidArgument(name + "alibi_slopes must be [H]");
  a.g = a.h / a.kh;
  a.max_pages = bd[1];
  a.q = q.typed_data(), a.kp = k_pages.typed_data(), a.vp = v_pages.typed_data();
  a.lens = kv_lens.typed_data(), a.bt = block_tables.typed_data();
  a.slopes = has_alibi ? alibi_slopes.typed_data() : nullptr;
  a.scale = scale, a.soft_cap = soft_cap, a.window = sliding_window;

  // Validate every page a sequence covers before reading any of them.
  int64_t longest = 0;
  for (int64_t b = 0; b < a.b; ++b) {
    const int64_t n = a.lens[b];
    if (n < 0 || n > a.max_pages * a.s)
      return ffi::Error::InvalidArgument(name + "kv_lens[" + std::to_string(b) + "]=" + std::to_string(n) +
                                         " is outside [0, max_pages * page_size = " +
                                         std::to_string(a.max_pages * a.s) + "]");
    const int64_t used = (n + a.s - 1) / a.s;
    for (int64_t i = 0; i < used; ++i) {
      const int64_t id = a.bt[b * a.max_pages + i];
      if (id < 0 || id >= a.p)
        return ffi::Error::InvalidArgument(name + "block_tables[" + std::to_string(b) + ", " + std::to_string(i) +
                                           "]=" + std::to_string(id) + " is not a page id in [0, " +
                                           std::to_string(a.p) + ") (sequence " + std::to_string(b) + " covers " +
                                           std::to_string(used) + " pages)");
    }
    longest = std::max(longest, n);
  }

  bool isa_ok;
  const RangeFn range = RangeFor(ResolveIsa(isa, &isa_ok), a.d);
  if (!isa_ok)
    return ffi::Error::InvalidArgument(name + "isa=" + std::to_string(isa) +
                                       " is not an instruction-set path this CPU runs");
  // Context splits: enough units for every thread to get several, never splits shorter than 64 keys.
  const int64_t want = 8 * std::max<int64_t>(1, pool.num_threads());
  int64_t splits = std::max<int64_t>(1, (want + a.b - 1) / std::max<int64_t>(1, a.b));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, longest / 64));
  const int64_t span = std::max<int64_t>(1, (longest + splits - 1) / splits);  // keys per split
  const int64_t per = StateFloats(a);  // state of one kv head's G query heads: m, l, acc
  std::vector<float> scratch(a.b * splits * a.kh * per);
  float* outp = out->typed_data();
  auto unit_state = [&](int64_t b, int64_t sp) { return scratch.data() + (b * splits + sp) * a.kh * per; };
  auto state = [&](int64_t b, int64_t sp, int64_t kv) { return StateAt(a, unit_state(b, sp), kv); };

  ParallelFor(pool, a.b * splits, [&](int64_t u) {
    const int64_t b = u / splits, sp = u % splits;
    for (int64_t kv = 0; kv < a.kh; ++kv) {
      Partial st = state(b, sp, kv);
      std::fill(st.m, st.m + a.g, kNegInf);
      std::fill(st.l, st.l + a.g, 0.f);
      std::fill(st.acc, st.acc + a.g * a.d, 0.f);
    }
    int64_t lo, hi;
    KeyRange(a, b, &lo, &hi);
    const int64_t j0 = std::max(lo, sp * span), j1 = std::min(hi, (sp + 1) * span);
    if (j0 < j1) range(a, b, j0, j1, unit_state(b, sp));
  });
  // Merge the splits by log-sum-exp; a head with nothing to attend to gets zeros.
  for (int64_t b = 0; b < a.b; ++b)
    for (int64_t kv = 0; kv < a.kh; ++kv)
      for (int64_t g = 0; g < a.g; ++g) {
        float m = kNegInf;
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float sm = state(b, sp, kv).m[g];
          m = std::isnan(sm) ? sm : std::max(m, sm);  // a NaN running max (a NaN logit) stays NaN
        }
        float* o = outp + (b * a.h + kv * a.g + g) * a.d;
        std::fill(o, o + a.d, 0.f);
        if (m == kNegInf) continue;
        float l = 0.f;
        for (int64_t sp = 0; sp < splits; ++sp) {
          const Partial st = state(b, sp, kv);
          if (st.m[g] == kNegInf) continue;
          const float w = std::exp(st.m[g] - m);
          l += st.l[g] * w;
          const float* acc = st.acc + g * a.d;
          for (int64_t i = 0; i < a.d; ++i) o[i] += w * acc[i];
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t i = 0; i < a.d; ++i) o[i] *= inv;
      }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace decode
}  // namespace tokenlab

// The library is built with hidden visibility; only the handlers are exported.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(TokenlabPagedDecode, tokenlab::decode::PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pages [P, S, K, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pages [P, S, K, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables [B, max_pages]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // alibi_slopes [H] (ignored unless has_alibi)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, H, D]
                                  .Attr<float>("scale")
                                  .Attr<float>("soft_cap")        // 0: none
                                  .Attr<int64_t>("sliding_window")  // 0: none
                                  .Attr<int64_t>("has_alibi")
                                  .Attr<int64_t>("isa"));  // -1: the process-wide path; else that Isa
#pragma GCC visibility pop
