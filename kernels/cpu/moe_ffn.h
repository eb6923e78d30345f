// Grouped SwiGLU expert FFN: the operands shared by its instruction-set paths (moe_ffn*.cc).
#pragma once

#include <cstdint>

#include "isa.h"

namespace tokenlab {
namespace moe {

// One block product of the FFN: C[0:m, c0:c1] (+)= A[0:m, k0:k1] @ B[k0:k1, c0:c1], every matrix row-major
// with its own row stride; B is an expert's weight read in place.
struct Gemm {
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  int64_t m;
};

// Rows of A up to which the decode algorithm (StreamGemm) runs.
constexpr int64_t kStreamMaxRows = 8;

// Portable path; also the tail columns of the vector paths. accumulate=false overwrites C.
void ScalarGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1, bool accumulate);
// h[i] = silu(h[i]) * u[i] for i in [0, n).
void ScalarSiluMul(float* h, const float* u, int64_t n);

// BlockGemm: register-blocked, for any number of rows. StreamGemm (m <= kStreamMaxRows, overwrites C): B's rows
// [k0, k1) read in memory order, 4 at a time across all columns [c0, c1), C's few rows staying in L1.
// Vector paths: any column range (the tail below the lane count runs the scalar code). Each may only run
// where IsaRunsHere says so.
#if defined(TOKENLAB_X86)
namespace avx512 {
void BlockGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1, bool accumulate);
void StreamGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1);
void SiluMul(float* h, const float* u, int64_t n);
}  // namespace avx512
namespace avx2 {
void BlockGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1, bool accumulate);
void StreamGemm(const Gemm& g, int64_t k0, int64_t k1, int64_t c0, int64_t c1);
void SiluMul(float* h, const float* u, int64_t n);
}  // namespace avx2
#endif

}  // namespace moe
}  // namespace tokenlab
