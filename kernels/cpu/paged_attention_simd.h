// Paged decode attention: the loops of the x86 vector paths, written once over a vector type S (the F32 of
// simd_avx2.h or simd_avx512.h) plus the path's own pieces:
//   kExpMin, kExpMax, ScaleByPow2(p, n)  the range of Exp's inputs and how it builds p * 2^n
//   SoftmaxTerms(...)                    a query head's chunk of logits (see HeadBlock): AVX-512 holds the
//                                        16 keys in one vector with lane masks, AVX2 needs two halves
// Included by paged_attention_avx2.cc and paged_attention_avx512.cc inside their own namespace and target
// region (see isa.h), hence no include guard and no includes. The algorithm is described in
// paged_attention.cc.

constexpr int64_t kChunk = 16;  // keys per chunk: a whole page at the common page size
constexpr int kHeadBlock = 4;   // query heads of one kv head served by each load of its keys and values

// exp for float32 lanes: 2^n * e^r with |r| <= ln2/2, degree-6 Taylor polynomial (rel. error ~2e-7).
template <class S>
inline typename S::V Exp(typename S::V x) {
  using V = typename S::V;
  // max/min return their second operand when either is NaN: NaN stays NaN.
  x = S::Max(S::Set1(S::kExpMin), x);
  x = S::Min(S::Set1(S::kExpMax), x);
  const V n = S::Round(S::Mul(x, S::Set1(1.44269504088896341f)));
  V r = S::Fnma(n, S::Set1(0.693359375f), x);
  r = S::Fnma(n, S::Set1(-2.12194440e-4f), r);
  V p = S::Set1(1.f / 720);
  p = S::Fma(p, r, S::Set1(1.f / 120));
  p = S::Fma(p, r, S::Set1(1.f / 24));
  p = S::Fma(p, r, S::Set1(1.f / 6));
  p = S::Fma(p, r, S::Set1(0.5f));
  p = S::Fma(p, r, S::Set1(1.f));
  p = S::Fma(p, r, S::Set1(1.f));
  return S::ScaleByPow2(p, n);
}

template <class S>
inline typename S::V Tanh(typename S::V y) {  // 1 - 2 / (e^{2y} + 1)
  const typename S::V e = Exp<S>(S::Add(y, y));
  return S::Sub(S::Set1(1.f), S::Div(S::Set1(2.f), S::Add(e, S::Set1(1.f))));
}

// Why the loops run this way: consecutive tokens of a kv head sit K * D floats apart (4 KiB for K=8, D=128), so
// the same head-dim slice of a chunk's tokens falls into one L1 set, and a chunk holds more such lines than
// the set has ways. Every key and value line is therefore used by all the block's query heads as soon as it
// is loaded, instead of being reloaded (from L2) once per query head.

// dots[gi][t] = the lane-wise partial sums of q[gi] . k[t] (summed across lanes later), two tokens per step.
template <class S, int GN>
inline void KeyDots(const float* const* q, const float* kbase, int64_t row_stride, int64_t dv, int64_t cnt,
                    typename S::V (*dots)[kChunk]) {
  using V = typename S::V;
  constexpr int W = S::kLanes;
  int64_t t = 0;
  for (; t + 2 <= cnt; t += 2) {
    const float* k0 = kbase + t * row_stride;
    const float* k1 = k0 + row_stride;
    V acc[GN][2];
    for (int gi = 0; gi < GN; ++gi) acc[gi][0] = acc[gi][1] = S::Zero();
    for (int64_t v = 0; v < dv; ++v) {
      const V a0 = S::Load(k0 + W * v), a1 = S::Load(k1 + W * v);
      for (int gi = 0; gi < GN; ++gi) {
        const V qv = S::Load(q[gi] + W * v);
        acc[gi][0] = S::Fma(qv, a0, acc[gi][0]);
        acc[gi][1] = S::Fma(qv, a1, acc[gi][1]);
      }
    }
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = acc[gi][0], dots[gi][t + 1] = acc[gi][1];
  }
  if (t < cnt) {
    const float* k0 = kbase + t * row_stride;
    V acc[GN];
    for (int gi = 0; gi < GN; ++gi) acc[gi] = S::Zero();
    for (int64_t v = 0; v < dv; ++v) {
      const V a0 = S::Load(k0 + W * v);
      for (int gi = 0; gi < GN; ++gi) acc[gi] = S::Fma(S::Load(q[gi] + W * v), a0, acc[gi]);
    }
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = acc[gi];
  }
  for (++t; t < kChunk; ++t)
    for (int gi = 0; gi < GN; ++gi) dots[gi][t] = S::Zero();
}

// out[gi] = corr[gi] * out[gi] + sum_t p[gi][t] * v[t], NV vectors of the head dim at a time.
template <class S, int GN, int NV>
inline void ValueBlock(const float* vbase, int64_t row_stride, int64_t cnt, const float (*p)[kChunk],
                       const float* corr, float* acc, int64_t d, int64_t off) {
  using V = typename S::V;
  constexpr int W = S::kLanes;
  V o[GN][NV];
  for (int gi = 0; gi < GN; ++gi)
    for (int j = 0; j < NV; ++j) o[gi][j] = S::Mul(S::Load(acc + gi * d + off + W * j), S::Set1(corr[gi]));
  for (int64_t t = 0; t < cnt; ++t) {
    V vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = S::Load(vbase + t * row_stride + off + W * j);
    for (int gi = 0; gi < GN; ++gi) {
      const V pb = S::Broadcast(&p[gi][t]);
      for (int j = 0; j < NV; ++j) o[gi][j] = S::Fma(pb, vv[j], o[gi][j]);
    }
  }
  for (int gi = 0; gi < GN; ++gi)
    for (int j = 0; j < NV; ++j) S::Store(acc + gi * d + off + W * j, o[gi][j]);
}

template <class S, int GN>
inline void WeightedValues(const float* vbase, int64_t row_stride, int64_t cnt, const float (*p)[kChunk],
                           const float* corr, float* acc, int64_t d) {
  constexpr int64_t kStep = 2 * S::kLanes;
  int64_t off = 0;
  for (; off + kStep <= d; off += kStep) ValueBlock<S, GN, 2>(vbase, row_stride, cnt, p, corr, acc, d, off);
  if (off < d) ValueBlock<S, GN, 1>(vbase, row_stride, cnt, p, corr, acc, d, off);
}

// Query heads [g0, g0 + GN) of kv head kv over one chunk. S::SoftmaxTerms(a, dots, cnt, slope, jpos0, &m,
// &shift, p_out) turns a head's dots into its logits (key j at position jpos0 + j relative to the query), and
// returns the sum of p = exp(logit - m_new) (written to p_out, zero past cnt) after moving the running max m
// to m_new, with shift = m_old - m_new.
template <class S, int GN>
void HeadBlock(const Args& a, int64_t b, int64_t kv, int64_t g0, int64_t jc, int64_t cnt, const float* kbase,
               const float* vbase, Partial st) {
  using V = typename S::V;
  static_assert(GN <= S::kLanes, "corr holds one lane per head");
  const int64_t pos = a.lens[b] - 1;
  const int64_t row_stride = a.kh * a.d;
  alignas(sizeof(V)) V dots[GN][kChunk];
  alignas(sizeof(V)) float p[GN][kChunk];
  alignas(sizeof(V)) float corr[S::kLanes] = {};
  float lsum[GN];
  const float* q[GN];
  for (int gi = 0; gi < GN; ++gi) q[gi] = a.q + (b * a.h + kv * a.g + g0 + gi) * a.d;
  KeyDots<S, GN>(q, kbase, row_stride, a.d / S::kLanes, cnt, dots);
  for (int gi = 0; gi < GN; ++gi) {
    const int64_t g = g0 + gi;
    const float slope = a.slopes ? a.slopes[kv * a.g + g] : 0.f;
    lsum[gi] = S::SoftmaxTerms(a, dots[gi], cnt, slope, static_cast<float>(jc - pos), &st.m[g], &corr[gi], p[gi]);
  }
  S::StoreAligned(corr, Exp<S>(S::LoadAligned(corr)));
  for (int gi = 0; gi < GN; ++gi) st.l[g0 + gi] = st.l[g0 + gi] * corr[gi] + lsum[gi];
  WeightedValues<S, GN>(vbase, row_stride, cnt, p, corr, st.acc + g0 * a.d, a.d);
}

// Keys [jc, jc + cnt) of one page (cnt <= kChunk) for kv head kv and its G query heads.
template <class S>
void Chunk(const Args& a, int64_t b, int64_t kv, int64_t jc, int64_t cnt, Partial st) {
  const int64_t page = a.bt[b * a.max_pages + jc / a.s];
  const int64_t t0 = jc % a.s;
  const float* kbase = a.kp + ((page * a.s + t0) * a.kh + kv) * a.d;
  const float* vbase = a.vp + ((page * a.s + t0) * a.kh + kv) * a.d;
  for (int64_t g0 = 0; g0 < a.g; g0 += kHeadBlock) {
    switch (std::min<int64_t>(kHeadBlock, a.g - g0)) {
      case 4: HeadBlock<S, 4>(a, b, kv, g0, jc, cnt, kbase, vbase, st); break;
      case 3: HeadBlock<S, 3>(a, b, kv, g0, jc, cnt, kbase, vbase, st); break;
      case 2: HeadBlock<S, 2>(a, b, kv, g0, jc, cnt, kbase, vbase, st); break;
      default: HeadBlock<S, 1>(a, b, kv, g0, jc, cnt, kbase, vbase, st); break;
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

// Keys [j0, j1) of sequence b for every kv head (the path's Range, see paged_attention.h).
template <class S>
void Walk(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state) {
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
      Chunk<S>(a, b, kv, jc, cnt, StateAt(a, unit_state, kv));
    }
    jc = next;
  }
}
