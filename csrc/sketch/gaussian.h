// The sketch's Gaussian test matrix as a pure function of (stream, row, column): SplitMix64
// counters turned into normals by Box-Muller. The same math runs on the host and on the device,
// so a CPU and a CUDA merge draw the same matrix for the same seed and key, whatever the memory
// budget or the order tensors are processed in. Column-major indexing means a wider sketch
// only appends columns: the first l columns do not depend on l.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/scalar.h"

namespace r2m {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;

R2M_HOST_DEVICE uint64_t splitmix64(uint64_t stream, uint64_t index) {
  uint64_t z = stream + (index + 1) * kGoldenGamma;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 53 random bits.
R2M_HOST_DEVICE double splitmix64_uniform(uint64_t stream, uint64_t index) {
  return static_cast<double>(splitmix64(stream, index) >> 11) * 0x1.0p-53;
}

// The stream of one sketch: the user's seed mixed with the caller's key (a hash of the tensor's
// name and shape), so different tensors and seeds draw independent matrices.
R2M_HOST_DEVICE uint64_t sketch_stream(uint64_t seed, uint64_t key) {
  return splitmix64(key, seed);
}

// Entry (row, column) of the rows x columns test matrix, a standard normal in double.
R2M_HOST_DEVICE double sketch_gaussian(uint64_t stream, int64_t rows, int64_t row, int64_t column) {
  const uint64_t index = 2 * (static_cast<uint64_t>(column) * rows + row);
  const double u1 = splitmix64_uniform(stream, index);
  const double u2 = splitmix64_uniform(stream, index + 1);
  // 1 - u1 lies in (0, 1], so the logarithm is finite.
  return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}

// Fills columns [column_begin, column_end) of the rows x columns matrix in column-major order,
// the order of its counters (out[column * rows + row], float; out points at column 0): the
// transpose's rows, which is how the sketch is used. Disjoint column ranges may be filled by
// different threads, with the same bits.
void sketch_columns_cpu(uint64_t seed, uint64_t key, int64_t rows, int64_t column_begin,
                        int64_t column_end, float* out);

#if defined(R2M_WITH_CUDA)
// The same matrix written by a CUDA kernel into device memory. Entries agree with the CPU's to
// float rounding (the device's log and cos may differ from the host's in the last double bit).
// Returns the launch's cudaError_t (0: none).
int sketch_matrix_cuda(uint64_t seed, uint64_t key, int64_t rows, int64_t columns, float* out,
                       void* stream);
#endif

}  // namespace r2m
