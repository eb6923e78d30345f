// Paged decode attention: the operands shared by its instruction-set paths (paged_attention*.cc).
#pragma once

#include <cstdint>
#include <limits>

#include "isa.h"

namespace tokenlab {
namespace decode {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Args {
  const float* q;   // [B, H, D]
  const float* kp;  // [P, S, K, D]
  const float* vp;  // [P, S, K, D]
  const int32_t* lens;
  const int32_t* bt;
  const float* slopes;  // [H] or nullptr
  int64_t b, h, d, p, s, kh, g, max_pages;
  float scale, soft_cap;
  int64_t window;  // 0: none
};

// State of one kv head's G query heads in one work unit: running max m, sum l, unnormalized output acc [G, D].
struct Partial {
  float* m;
  float* l;
  float* acc;
};

// Floats of state per kv head, and the Partial of kv head `kv` in a unit's state block (all K heads).
inline int64_t StateFloats(const Args& a) { return a.g * (a.d + 2); }
inline Partial StateAt(const Args& a, float* unit_state, int64_t kv) {
  float* base = unit_state + kv * StateFloats(a);
  return Partial{base, base + a.g, base + 2 * a.g};
}

// Keys [j0, j1) of sequence b for every kv head, folded into the unit's state (initialized by the caller).
// Portable path, any CPU and head dim.
void ScalarRange(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state);
// Vector paths: need D % kLanes == 0, and may only run where IsaRunsHere says so.
#if defined(TOKENLAB_X86)
namespace avx512 {
constexpr int64_t kLanes = 16;
void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state);
}  // namespace avx512
namespace avx2 {
constexpr int64_t kLanes = 8;
void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state);
}  // namespace avx2
#endif
#if defined(TOKENLAB_NEON)
namespace neon {
constexpr int64_t kLanes = 4;
void Range(const Args& a, int64_t b, int64_t j0, int64_t j1, float* unit_state);
}  // namespace neon
#endif

}  // namespace decode
}  // namespace tokenlab
