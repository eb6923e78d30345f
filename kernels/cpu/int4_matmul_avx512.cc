// INT4 dequant-matmul, AVX-512 (F + BW) path: 16 columns per vector. The loops are shared with the AVX2 path
// (int4_matmul_simd.h); this file sets their tuning for AVX-512's 32 registers and compiles them for AVX-512
// only (see isa.h). The algorithm is described in int4_matmul.cc.
#include <algorithm>
#include <cstdint>

#include "int4_matmul.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace int4 {
namespace avx512 {
TOKENLAB_BEGIN_TARGET(TOKENLAB_AVX512_ISA)
namespace {

#include "simd_avx512.h"

struct Vec : F32 {
  // As many as the registers hold (2 * M * NV accumulators).
  static constexpr int GemvVectors(int m) { return m <= 2 ? 4 : 2; }
  // All of a step's (up to 4): 32 registers hold them beside the accumulators.
  static constexpr int kGemvDequantVectors = 4;
  // A whole 64-column tile: 6 x 4 accumulators.
  static constexpr int kStripVectors = 4;
  // Two tiles ahead, in the same packed row.
  static const uint8_t* SlabPrefetch(const uint8_t* p, int64_t) { return p + 128; }
};

#include "int4_matmul_simd.h"
static_assert(Vec::kLanes == kLanes, "int4_matmul.cc splits the work by kLanes");

}  // namespace

void GemvColumns(const Args& a, const float* xsum, int64_t c0, int64_t c1) { Gemv<Vec>(a, xsum, c0, c1); }
void TiledColumns(const Args& a, int64_t c0, int64_t c1) { Tiled<Vec>(a, c0, c1); }

TOKENLAB_END_TARGET
}  // namespace avx512
}  // namespace int4
}  // namespace tokenlab

#endif  // TOKENLAB_X86
