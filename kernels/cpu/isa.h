// Instruction-set paths of the CPU-native kernels, chosen at run time.
//
// One build runs on any x86-64 (or any aarch64) CPU: the library is compiled for the architecture's baseline,
// and each vector path is compiled for its instruction set with the target attribute, then chosen per call
// from what the CPU reports (__builtin_cpu_supports). NEON is part of the aarch64 baseline, so its path needs
// no attribute. Paths are ordered: a CPU that runs one runs every lower one of its architecture (scalar <
// avx2 < avx512 on x86-64, scalar < neon on aarch64).
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#define TOKENLAB_X86 1
#include <immintrin.h>
#define TOKENLAB_AVX2_ISA "avx2,fma,f16c"
#define TOKENLAB_AVX512_ISA "avx2,fma,f16c,avx512f,avx512bw"
#endif

// TOKENLAB_BEGIN_TARGET(TOKENLAB_AVX2_ISA) ... TOKENLAB_END_TARGET compiles every function defined between
// them (template instantiations included) for that instruction set, whatever the command line says; such code
// may only run after the CPU check below. The vector paths share their loops as templates over a vector type
// (the *_simd.h headers), and each path's .cc file includes them inside its own namespace in such a region.
// So every instantiation is compiled for one target only and carries its path's name: an inline function
// compiled for AVX-512 in one file and kept by the linker for every caller would crash AVX2-only CPUs
// (tests/kernels/cpu/test_isa_codegen.py checks the built library for that).
#define TOKENLAB_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define TOKENLAB_BEGIN_TARGET(isa) \
  TOKENLAB_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define TOKENLAB_END_TARGET TOKENLAB_PRAGMA(clang attribute pop)
#else
#define TOKENLAB_BEGIN_TARGET(isa) TOKENLAB_PRAGMA(GCC push_options) TOKENLAB_PRAGMA(GCC target(isa))
#define TOKENLAB_END_TARGET TOKENLAB_PRAGMA(GCC pop_options)
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#define TOKENLAB_NEON 1
#include <arm_neon.h>
#endif

namespace tokenlab {

// Values are the library's C interface (TokenlabCpuIsa and friends); ordered by preference within an arch.
enum class Isa : int { kScalar = 0, kNeon = 1, kAvx2 = 2, kAvx512 = 3 };

// The best path this CPU runs.
Isa DetectedIsa();
// True when this CPU runs `isa` (scalar always; the architecture's own paths up to the detected one).
bool IsaRunsHere(Isa isa);
// The process-wide path (the detected one unless TokenlabCpuSetIsa chose a lower one).
Isa ActiveIsa();
// A kernel's per-call `isa` attribute: -1 is the process-wide path; otherwise that path, which must run
// here (*ok is set false if not, or for an unknown value).
Isa ResolveIsa(int64_t requested, bool* ok);
const char* IsaName(Isa isa);

}  // namespace tokenlab
