// INT4 dequant-matmul: the operands shared by its instruction-set paths (int4_matmul*.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "isa.h"

namespace tokenlab {
namespace int4 {

// Rows of x up to which the matrix-vector path runs; the tiled path (where an ISA has one) above.
constexpr int64_t kGemvMaxM = 4;
// Columns of one tiled-path tile, and rows of a dequantized slab (64 x 64 floats = 16 KiB, stays in L1).
constexpr int64_t kTile = 64;
constexpr int64_t kSlabRows = 64;
// Packed rows swept together by the matrix-vector path: kRowBlock short sequential streams, which the hardware
// prefetchers follow, instead of walking one narrow column tile down all K rows (a new 4 KiB page, and a TLB
// miss, every row).
constexpr int64_t kRowBlock = 8;

struct Args {
  const float* x;        // [M, K]
  const uint8_t* packed;  // [K/2, N]
  const float* scales;    // [G, N]
  const uint8_t* zeros;   // [G, N], or nullptr when symmetric
  float sym_zero;
  float* y;  // [M, N]
  int64_t m, k, n, group_size;
};

inline float ZeroAt(const Args& a, int64_t g, int64_t col) {
  return a.zeros ? static_cast<float>(a.zeros[g * a.n + col]) : a.sym_zero;
}

// Portable path over columns [c0, c1), any CPU; also the tail columns of the vector paths.
void ScalarColumns(const Args& a, int64_t c0, int64_t c1);

// Vector paths. Gemv: any M, columns [c0, c1) a multiple of the ISA's lane count; xsum [M, G] is the sum of x
// over each group. Tiled: columns a multiple of kTile. Each may only run where IsaRunsHere says so.
#if defined(TOKENLAB_X86)
namespace avx512 {
constexpr int64_t kLanes = 16;
void GemvColumns(const Args& a, const float* xsum, int64_t c0, int64_t c1);
void TiledColumns(const Args& a, int64_t c0, int64_t c1);
}  // namespace avx512
namespace avx2 {
constexpr int64_t kLanes = 8;
void GemvColumns(const Args& a, const float* xsum, int64_t c0, int64_t c1);
void TiledColumns(const Args& a, int64_t c0, int64_t c1);
}  // namespace avx2
#endif
#if defined(TOKENLAB_NEON)
namespace neon {
constexpr int64_t kLanes = 4;
void GemvColumns(const Args& a, const float* xsum, int64_t c0, int64_t c1);
}  // namespace neon
#endif

}  // namespace int4
}  // namespace tokenlab
