#include "sketch/gaussian.h"

namespace r2m {

void sketch_matrix_cpu(uint64_t seed, uint64_t key, int64_t rows, int64_t columns, float* out) {
  const uint64_t stream = sketch_stream(seed, key);
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t column = 0; column < columns; ++column) {
      out[row * columns + column] = static_cast<float>(sketch_gaussian(stream, rows, row, column));
    }
  }
}

}  // namespace r2m
