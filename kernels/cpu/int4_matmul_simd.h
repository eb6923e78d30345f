// INT4 dequant-matmul: the loops of the x86 vector paths, written once over a vector type S (the F32 of
// simd_avx2.h or simd_avx512.h) plus the path's own tuning, chosen for its register count:
//   GemvVectors(M)       column vectors per matrix-vector step for M rows of x
//   kGemvDequantVectors  how many of those are dequantized before the FMAs that use them (each holds two
//                        registers while every row of x runs over it)
//   kStripVectors        column vectors of the tiled path's register block
//   SlabPrefetch(p, n)   the packed bytes to prefetch while dequantizing row p of a tile
// Included by int4_matmul_avx2.cc and int4_matmul_avx512.cc inside their own namespace and target region (see
// isa.h), hence no include guard and no includes. The algorithm is described in int4_matmul.cc.

template <class S>
inline typename S::V LoadZeros(const Args& a, int64_t g, int64_t col) {
  if (!a.zeros) return S::Set1(a.sym_zero);
  return S::ToFloat(S::LoadU8(a.zeros + g * a.n + col));
}

// kRowBlock packed rows x (W * NV) columns for M rows of x; the partial sums stay in registers (2 * M * NV),
// then y[m, cols] += s * partial, with the zero-point term -s * z * sum(x over the group) on the group's first
// block.
template <class S, int M, int NV>
inline void GemvStep(const Args& a, const float* xsum, int64_t g, bool first_block, const uint8_t* p0,
                     const float* x0, int64_t nr, int64_t c) {
  using V = typename S::V;
  constexpr int W = S::kLanes;
  const int64_t groups = a.k / a.group_size;
  // Even and odd rows accumulate separately: twice the independent FMA chains.
  V acc_e[M][NV], acc_o[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc_e[m][v] = acc_o[m][v] = S::Zero();
  constexpr int DV = NV < S::kGemvDequantVectors ? NV : S::kGemvDequantVectors;
  static_assert(NV % DV == 0, "whole blocks of dequantized vectors");
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* p = p0 + r * a.n + c;
    for (int v0 = 0; v0 < NV; v0 += DV) {
      V lo[DV], hi[DV];
      for (int v = 0; v < DV; ++v) {
        const typename S::VI b = S::LoadU8(p + W * (v0 + v));
        lo[v] = S::LowNibbles(b);
        hi[v] = S::HighNibbles(b);
      }
      for (int m = 0; m < M; ++m) {
        const V xe = S::Broadcast(x0 + m * a.k + 2 * r);
        const V xo = S::Broadcast(x0 + m * a.k + 2 * r + 1);
        for (int v = 0; v < DV; ++v) {
          acc_e[m][v0 + v] = S::Fma(xe, lo[v], acc_e[m][v0 + v]);
          acc_o[m][v0 + v] = S::Fma(xo, hi[v], acc_o[m][v0 + v]);
        }
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const V s = S::Load(a.scales + g * a.n + c + W * v);
    const V z = first_block ? LoadZeros<S>(a, g, c + W * v) : S::Zero();
    for (int m = 0; m < M; ++m) {
      V acc = S::Add(acc_e[m][v], acc_o[m][v]);
      if (first_block) acc = S::Fnma(S::Set1(xsum[m * groups + g]), z, acc);
      float* yp = a.y + m * a.n + c + W * v;
      S::Store(yp, S::Fma(s, acc, S::Load(yp)));
    }
  }
}

template <class S, int M>
void GemvRange(const Args& a, const float* xsum, int64_t c0, int64_t c1) {
  constexpr int W = S::kLanes;
  const int64_t groups = a.k / a.group_size;
  const int64_t rows_per_group = a.group_size / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = c0; c < c1; c += W) S::Store(a.y + m * a.n + c, S::Zero());
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t rb = 0; rb < rows_per_group; rb += kRowBlock) {
      const int64_t r0 = g * rows_per_group + rb;
      const int64_t nr = std::min(kRowBlock, rows_per_group - rb);
      const uint8_t* p0 = a.packed + r0 * a.n;
      const float* x0 = a.x + 2 * r0;
      constexpr int kNV = S::GemvVectors(M);
      int64_t c = c0;
      for (; c + W * kNV <= c1; c += W * kNV) GemvStep<S, M, kNV>(a, xsum, g, rb == 0, p0, x0, nr, c);
      for (; c < c1; c += W) GemvStep<S, M, 1>(a, xsum, g, rb == 0, p0, x0, nr, c);
    }
  }
}

// An MB x (W * kStripVectors) register-blocked float kernel over one strip of a dequantized slab:
// y[m, strip] += s * (x[m, slab rows] @ slab[:, strip]).
template <class S, int MB>
inline void SlabMatmul(const Args& a, const float* slab, int64_t rows, int64_t r0, const typename S::V* s,
                       int64_t m0, int64_t col) {
  using V = typename S::V;
  constexpr int W = S::kLanes, NS = S::kStripVectors;
  V acc[MB][NS];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NS; ++v) acc[i][v] = S::Zero();
  const float* xb = a.x + m0 * a.k + r0;
  for (int64_t r = 0; r < rows; ++r) {
    V w[NS];
    for (int v = 0; v < NS; ++v) w[v] = S::LoadAligned(slab + r * kTile + W * v);
    for (int i = 0; i < MB; ++i) {
      const V xv = S::Broadcast(xb + i * a.k + r);
      for (int v = 0; v < NS; ++v) acc[i][v] = S::Fma(xv, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* yr = a.y + (m0 + i) * a.n + col;
    for (int v = 0; v < NS; ++v) S::Store(yr + W * v, S::Fma(s[v], acc[i][v], S::Load(yr + W * v)));
  }
}

// The path's GemvColumns (see int4_matmul.h): four rows of x at a time.
template <class S>
void Gemv(const Args& a, const float* xsum, int64_t c0, int64_t c1) {
  Args b = a;
  for (int64_t m0 = 0; m0 < a.m; m0 += 4) {
    b.x = a.x + m0 * a.k;
    b.y = a.y + m0 * a.n;
    const float* xs = xsum + m0 * (a.k / a.group_size);
    switch (std::min<int64_t>(4, a.m - m0)) {
      case 4: GemvRange<S, 4>(b, xs, c0, c1); break;
      case 3: GemvRange<S, 3>(b, xs, c0, c1); break;
      case 2: GemvRange<S, 2>(b, xs, c0, c1); break;
      default: GemvRange<S, 1>(b, xs, c0, c1); break;
    }
  }
}

// The path's TiledColumns (see int4_matmul.h): each kSlabRows x kTile slab of the weights is dequantized once
// into L1, then multiplied by every row of x.
template <class S>
void Tiled(const Args& a, int64_t c0, int64_t c1) {
  using V = typename S::V;
  constexpr int W = S::kLanes, kTileVectors = kTile / W, kStrip = W * S::kStripVectors;
  alignas(64) float slab[kSlabRows * kTile];
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t c = c0; c < c1; c += W) S::Store(a.y + m * a.n + c, S::Zero());
  for (int64_t r0 = 0, r1; r0 < a.k; r0 = r1) {
    const int64_t g = r0 / a.group_size;
    r1 = std::min({r0 + kSlabRows, (g + 1) * a.group_size, a.k});
    const int64_t rows = r1 - r0;
    for (int64_t col = c0; col < c1; col += kTile) {
      V z[kTileVectors];
      for (int v = 0; v < kTileVectors; ++v) z[v] = LoadZeros<S>(a, g, col + W * v);
      const uint8_t* p = a.packed + (r0 / 2) * a.n + col;
      for (int64_t r = 0; r < rows; r += 2, p += a.n) {
        _mm_prefetch(reinterpret_cast<const char*>(S::SlabPrefetch(p, a.n)), _MM_HINT_T0);
        float* dst = slab + r * kTile;
        for (int v = 0; v < kTileVectors; ++v) {
          const typename S::VI b = S::LoadU8(p + W * v);
          S::StoreAligned(dst + W * v, S::Sub(S::LowNibbles(b), z[v]));
          S::StoreAligned(dst + kTile + W * v, S::Sub(S::HighNibbles(b), z[v]));
        }
      }
      for (int64_t strip = 0; strip < kTile; strip += kStrip) {
        V s[S::kStripVectors];
        for (int v = 0; v < S::kStripVectors; ++v) s[v] = S::Load(a.scales + g * a.n + col + strip + W * v);
        const float* w = slab + strip;
        int64_t m0 = 0;
        for (; m0 + 6 <= a.m; m0 += 6) SlabMatmul<S, 6>(a, w, rows, r0, s, m0, col + strip);
        for (; m0 + 4 <= a.m; m0 += 4) SlabMatmul<S, 4>(a, w, rows, r0, s, m0, col + strip);
        for (; m0 + 2 <= a.m; m0 += 2) SlabMatmul<S, 2>(a, w, rows, r0, s, m0, col + strip);
        for (; m0 < a.m; ++m0) SlabMatmul<S, 1>(a, w, rows, r0, s, m0, col + strip);
      }
    }
  }
}
