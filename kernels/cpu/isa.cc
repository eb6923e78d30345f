// Run-time detection and selection of the kernels' instruction-set path, and its C interface (read by
// kernels/cpu/loader.py through ctypes).
#include "isa.h"

#include <atomic>

namespace tokenlab {
namespace {

Isa Detect() {
#if defined(TOKENLAB_X86)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
  return Isa::kScalar;
#elif defined(TOKENLAB_NEON)
  return Isa::kNeon;
#else
  return Isa::kScalar;
#endif
}

// The process-wide choice. Function-local statics: initialized on first use, thread-safe.
std::atomic<int>& Selected() {
  static std::atomic<int> selected{static_cast<int>(DetectedIsa())};
  return selected;
}

}  // namespace

Isa DetectedIsa() {
  static const Isa detected = Detect();
  return detected;
}

bool IsaRunsHere(Isa isa) {
  const Isa best = DetectedIsa();
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kNeon: return best == Isa::kNeon;
    case Isa::kAvx2: return best == Isa::kAvx2 || best == Isa::kAvx512;
    case Isa::kAvx512: return best == Isa::kAvx512;
  }
  return false;
}

Isa ActiveIsa() { return static_cast<Isa>(Selected().load(std::memory_order_relaxed)); }

Isa ResolveIsa(int64_t requested, bool* ok) {
  *ok = true;
  if (requested < 0) return ActiveIsa();
  if (requested > static_cast<int64_t>(Isa::kAvx512) || !IsaRunsHere(static_cast<Isa>(requested))) {
    *ok = false;
    return Isa::kScalar;
  }
  return static_cast<Isa>(requested);
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kNeon: return "neon";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

}  // namespace tokenlab

#pragma GCC visibility push(default)
extern "C" {

// The best path this CPU runs (0 scalar, 1 neon, 2 avx2, 3 avx512).
int TokenlabCpuDetectedIsa(void) { return static_cast<int>(tokenlab::DetectedIsa()); }

// The path the kernels use when a call does not name one.
int TokenlabCpuIsa(void) { return static_cast<int>(tokenlab::ActiveIsa()); }

// 1 when this CPU runs path `isa`, else 0.
int TokenlabCpuIsaRunsHere(int isa) {
  return isa >= 0 && isa <= static_cast<int>(tokenlab::Isa::kAvx512) &&
         tokenlab::IsaRunsHere(static_cast<tokenlab::Isa>(isa));
}

// Chooses the process-wide path; returns 0, or -1 (and changes nothing) when this CPU does not run it.
int TokenlabCpuSetIsa(int isa) {
  if (isa < 0 || isa > static_cast<int>(tokenlab::Isa::kAvx512) ||
      !tokenlab::IsaRunsHere(static_cast<tokenlab::Isa>(isa)))
    return -1;
  tokenlab::Selected().store(isa, std::memory_order_relaxed);
  return 0;
}

}  // extern "C"
#pragma GCC visibility pop
