// Grouped SwiGLU expert FFN, AVX-512 (F + BW) path: 16 columns per vector. The loops are shared with the
// AVX2 path (moe_ffn_simd.h); this file sets their register block for 32 registers and compiles them
// for AVX-512 only (see isa.h). The algorithm is described in moe_ffn.cc.
#include <cstdint>

#include "moe_ffn.h"

#if defined(TOKENLAB_X86)

namespace tokenlab {
namespace moe {
namespace avx512 {
TOKENLAB_BEGIN_TARGET(TOKENLAB_AVX512_ISA)
namespace {

#include "simd_avx512.h"

struct Vec : F32 {
  static constexpr int kRows = 8;  // 8 x 2 vectors = 16 accumulators of the 32 registers
};

#include "moe_ffn_simd.h"

}  // namespace

void BlockGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1, bool accumulate) {
  Block<Vec>(g, k0, k1, c0, c1, accumulate);
}
void StreamGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1) { Stream<Vec>(g, k0, k1, c0, c1); }
void SiluMul(float* h, const float* u, int64_t n) { Silu<Vec>(h, u, n); }

TOKENLAB_END_TARGET
}  // namespace avx512
}  // namespace moe
}  // namespace tokenlab

#endif  // TOKENLAB_X86
