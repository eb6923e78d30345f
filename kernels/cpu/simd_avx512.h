// The AVX-512 (F + BW) float vector that the shared loops of the vector paths (*_simd.h) are written against:
// 16 lanes, 32 registers. The members are those of simd_avx2.h (see there).
//
// Included by each AVX-512 path file inside its own namespace and TOKENLAB_BEGIN_TARGET(TOKENLAB_AVX512_ISA)
// region (see isa.h), hence no include guard and no includes.
struct F32 {
  using V = __m512;
  using VI = __m512i;
  static constexpr int kLanes = 16;

  static V Zero() { return _mm512_setzero_ps(); }
  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static V LoadAligned(const float* p) { return _mm512_load_ps(p); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void StoreAligned(float* p, V v) { _mm512_store_ps(p, v); }

  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm512_div_ps(a, b); }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }
  static V Min(V a, V b) { return _mm512_min_ps(a, b); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V Round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V Pow2(V n) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  // AVX512F has no float OR (that is AVX512DQ): set the sign through the integer view.
  static V NegAbs(V x) {
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
  }
  static V SelectNegative(V x, V if_neg, V otherwise) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), otherwise, if_neg);
  }

  static VI LoadU8(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V LowNibbles(VI b) { return _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF))); }
  static V HighNibbles(VI b) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)); }
  static V ToFloat(VI b) { return _mm512_cvtepi32_ps(b); }
};
