// INT4 dequant-matmul, AVX2 (+ FMA, F16C) path: 8 columns per vector. The loops are shared with the AVX-512
// path (int4_matmul_simd.h); this file sets their tuning for AVX2's 16 registers and compiles them for AVX2
// only (see isa.h). The algorithm is described in int4_matmul.cc.
#include <algorithm>
#include <cstdint>

#include "int4_matmul.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace int4 {
namespace avx2 {
TOKENLAB_BEGIN_TARGET(TOKENLAB_AVX2_ISA)
namespace {

#include "simd_avx2.h"

struct Vec : F32 {
  // 2 * M * NV accumulators, within the 16 registers.
  static constexpr int GemvVectors(int m) { return m == 1 ? 4 : m == 2 ? 2 : 1; }
  // One at a time: more would not fit beside the accumulators in 16 registers.
  static constexpr int kGemvDequantVectors = 1;
  // 16-column strips: 6 x 2 accumulators.
  static constexpr int kStripVectors = 2;
  // Four packed rows ahead, in the same columns.
  static const uint8_t* SlabPrefetch(const uint8_t* p, int64_t n) { return p + 4 * n; }
};

#include "int4_matmul_simd.h"
static_assert(Vec::kLanes == kLanes, "int4_matmul.cc splits the work by kLanes");

}  // namespace

void GemvColumns(const Args& a, const float* xsum, int64_t c0, int64_t c1) { Gemv<Vec>(a, xsum, c0, c1); }
void TiledColumns(const Args& a, int64_t c0, int64_t c1) { Tiled<Vec>(a, c0, c1); }

TOKENLAB_END_TARGET
}  // namespace avx2
}  // namespace int4
}  // namespace tokenlab

#endif  // TOKENLAB_X86
