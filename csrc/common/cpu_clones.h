// Runtime choice of vector width for the CPU kernels. The extension is built for the x86-64
// baseline (SSE2: 4 floats per instruction), so that one build runs on any x86-64 machine; a
// kernel marked R2M_CPU_CLONES is compiled again for AVX2 and AVX-512, and the loader picks the
// widest the CPU has (GCC/Clang function multiversioning, resolved once through an ifunc). The
// helpers such a kernel calls are R2M_ALWAYS_INLINE, so that they are compiled into each clone
// instead of being called at the baseline width. Every build compiles with -ffp-contract=off: no
// clone fuses a multiply and an add, so all clones give the same bits per element (the kernels fix
// their own summation order in explicit lanes).
#pragma once

#include "common/scalar.h"  // R2M_ALWAYS_INLINE

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__)
#define R2M_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define R2M_CPU_CLONES
#endif
