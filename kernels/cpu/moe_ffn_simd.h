// Grouped SwiGLU expert FFN: the loops of the x86 vector paths, written once over a vector type S (the F32 of
// simd_avx2.h or simd_avx512.h) plus kRows, the rows of BlockGemm's register block (kRows x 2 vectors of
// sums, sized to the path's registers). Included by moe_ffn_avx2.cc and moe_ffn_avx512.cc inside their own
// namespace and target region (see isa.h), hence no include guard and no includes. The algorithm is
// described in moe_ffn.cc.

// C[r0 : r0+MB, c : c+W*NV] (+)= A[r0 : r0+MB, k0:k1] @ B[k0:k1, c : c+W*NV], the sums in registers.
template <class S, int MB, int NV>
inline void Kernel(const Gemm& g, int64_t r0, int64_t k0, int64_t k1, int64_t c, bool accumulate) {
  using V = typename S::V;
  constexpr int W = S::kLanes;
  V acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? S::Load(g.c + (r0 + m) * g.ldc + c + W * v) : S::Zero();
  const float* a0 = g.a + r0 * g.lda;
  for (int64_t k = k0; k < k1; ++k) {
    const float* brow = g.b + k * g.ldb + c;
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = S::Load(brow + W * v);
    for (int m = 0; m < MB; ++m) {
      const V x = S::Broadcast(a0 + m * g.lda + k);
      for (int v = 0; v < NV; ++v) acc[m][v] = S::Fma(x, b[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) S::Store(g.c + (r0 + m) * g.ldc + c + W * v, acc[m][v]);
}

// Every column strip of one row block; few rows (decode) take wider strips for more independent sums.
template <class S, int MB>
void Rows(const Gemm& g, int64_t r0, int64_t k0, int64_t k1, int64_t c0, int64_t c1, bool accumulate) {
  constexpr int W = S::kLanes;
  int64_t c = c0;
  if (MB <= 2)
    for (; c + 4 * W <= c1; c += 4 * W) Kernel<S, MB, 4>(g, r0, k0, k1, c, accumulate);
  for (; c + 2 * W <= c1; c += 2 * W) Kernel<S, MB, 2>(g, r0, k0, k1, c, accumulate);
  for (; c + W <= c1; c += W) Kernel<S, MB, 1>(g, r0, k0, k1, c, accumulate);
}

// The last `rows` (< S::kRows) rows of the block walk, from r0.
template <class S, int MB>
inline void TailRows(const Gemm& g, int64_t rows, int64_t r0, int64_t k0, int64_t k1, int64_t c0, int64_t c1,
                     bool accumulate) {
  if constexpr (MB > 0) {
    if (rows == MB) Rows<S, MB>(g, r0, k0, k1, c0, c1, accumulate);
    else TailRows<S, MB - 1>(g, rows, r0, k0, k1, c0, c1, accumulate);
  }
}

// The path's StreamGemm (see moe_ffn.h).
template <class S>
void Stream(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1) {
  using V = typename S::V;
  constexpr int W = S::kLanes;
  const int64_t vec_end = c0 + (c1 - c0) / W * W;
  for (int64_t m = 0; m < g.m; ++m)
    for (int64_t c = c0; c < c1; ++c) g.c[m * g.ldc + c] = 0.f;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* b0 = g.b + k * g.ldb;
    V a[kStreamMaxRows][4];
    for (int64_t m = 0; m < g.m; ++m)
      for (int j = 0; j < 4; ++j) a[m][j] = S::Set1(g.a[m * g.lda + k + j]);
    for (int64_t c = c0; c < vec_end; c += W) {
      const V v0 = S::Load(b0 + c), v1 = S::Load(b0 + g.ldb + c);
      const V v2 = S::Load(b0 + 2 * g.ldb + c), v3 = S::Load(b0 + 3 * g.ldb + c);
      for (int64_t m = 0; m < g.m; ++m) {
        float* cp = g.c + m * g.ldc + c;
        V s = S::Fma(a[m][0], v0, S::Load(cp));
        s = S::Fma(a[m][1], v1, s);
        s = S::Fma(a[m][2], v2, s);
        S::Store(cp, S::Fma(a[m][3], v3, s));
      }
    }
  }
  for (; k < k1; ++k) {
    const float* b0 = g.b + k * g.ldb;
    for (int64_t m = 0; m < g.m; ++m) {
      const V a = S::Set1(g.a[m * g.lda + k]);
      float* cp = g.c + m * g.ldc;
      for (int64_t c = c0; c < vec_end; c += W) S::Store(cp + c, S::Fma(a, S::Load(b0 + c), S::Load(cp + c)));
    }
  }
  if (vec_end < c1) ScalarGemm(g, k0, k1, vec_end, c1, false);
}

// The path's BlockGemm (see moe_ffn.h).
template <class S>
void Block(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1, bool accumulate) {
  const int64_t vec_end = c0 + (c1 - c0) / S::kLanes * S::kLanes;
  int64_t r = 0;
  for (; r + S::kRows <= g.m; r += S::kRows) Rows<S, S::kRows>(g, r, k0, k1, c0, vec_end, accumulate);
  TailRows<S, S::kRows - 1>(g, g.m - r, r, k0, k1, c0, vec_end, accumulate);
  if (vec_end < c1) ScalarGemm(g, k0, k1, vec_end, c1, accumulate);
}

// exp(x) for x <= 0 (the argument here is -|h|): 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 in two
// parts, p a degree-6 polynomial; below -87 it flushes to 0.
template <class S>
inline typename S::V ExpNonPositive(typename S::V x) {
  using V = typename S::V;
  x = S::Max(x, S::Set1(-87.0f));
  const V n = S::Round(S::Mul(x, S::Set1(1.44269504088896341f)));
  V r = S::Fnma(n, S::Set1(0.693359375f), x);
  r = S::Fnma(n, S::Set1(-2.12194440e-4f), r);
  V p = S::Set1(1.9875691500e-4f);
  p = S::Fma(p, r, S::Set1(1.3981999507e-3f));
  p = S::Fma(p, r, S::Set1(8.3334519073e-3f));
  p = S::Fma(p, r, S::Set1(4.1665795894e-2f));
  p = S::Fma(p, r, S::Set1(1.6666665459e-1f));
  p = S::Fma(p, r, S::Set1(5.0000001201e-1f));
  p = S::Fma(p, S::Mul(r, r), S::Add(r, S::Set1(1.0f)));
  return S::Mul(p, S::Pow2(n));
}

// The path's SiluMul (see moe_ffn.h): silu(h) * u with sigmoid(h) = 1 / (1 + e^-h) for h >= 0 and
// e^h / (1 + e^h) below (no overflow); a NaN h stays NaN (it multiplies the result).
template <class S>
void Silu(float* h, const float* u, int64_t n) {
  using V = typename S::V;
  const V one = S::Set1(1.0f);
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    const V x = S::Load(h + i);
    const V t = ExpNonPositive<S>(S::NegAbs(x));  // e^-|x|
    const V inv = S::Div(one, S::Add(one, t));
    const V sig = S::SelectNegative(x, S::Mul(t, inv), inv);
    S::Store(h + i, S::Mul(S::Mul(x, sig), S::Load(u + i)));
  }
  if (i < n) ScalarSiluMul(h + i, u + i, n - i);
}
