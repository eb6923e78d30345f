// The AVX2 (+ FMA) float vector that the shared loops of the vector paths (*_simd.h) are written against:
// 8 lanes, 16 registers. simd_avx512.h has the same members for AVX-512.
//
// Included by each AVX2 path file inside its own namespace and TOKENLAB_BEGIN_TARGET(TOKENLAB_AVX2_ISA)
// region (see isa.h), hence no include guard and no includes: every file gets its own copy, compiled for AVX2
// alone. Each member is one intrinsic or a short fixed sequence of them, so a loop written with these compiles,
// and rounds, as one written with the intrinsics themselves.
struct F32 {
  using V = __m256;
  using VI = __m256i;
  static constexpr int kLanes = 8;

  static V Zero() { return _mm256_setzero_ps(); }
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static V LoadAligned(const float* p) { return _mm256_load_ps(p); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void StoreAligned(float* p, V v) { _mm256_store_ps(p, v); }

  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm256_div_ps(a, b); }
  // max/min return their second operand when either is NaN: callers put the value to keep NaN second.
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
  static V Min(V a, V b) { return _mm256_min_ps(a, b); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }    // a * b + c, one rounding
  static V Fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
  static V Round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-126, 127], built from the exponent bits.
  static V Pow2(V n) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static V NegAbs(V x) { return _mm256_or_ps(x, _mm256_set1_ps(-0.0f)); }  // -|x|
  // Per lane: if_neg where x < 0, else otherwise.
  static V SelectNegative(V x, V if_neg, V otherwise) {
    return _mm256_blendv_ps(otherwise, if_neg, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
  }

  // kLanes bytes, zero-extended to int32 lanes; their low and high nibbles, and the bytes, as floats.
  static VI LoadU8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static V LowNibbles(VI b) { return _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF))); }
  static V HighNibbles(VI b) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)); }
  static V ToFloat(VI b) { return _mm256_cvtepi32_ps(b); }
};
