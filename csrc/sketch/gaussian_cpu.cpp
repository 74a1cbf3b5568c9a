#include "sketch/gaussian.h"

namespace r2m {

void sketch_columns_cpu(uint64_t seed, uint64_t key, int64_t rows, int64_t column_begin,
                        int64_t column_end, float* out) {
  const uint64_t stream = sketch_stream(seed, key);
  for (int64_t column = column_begin; column < column_end; ++column) {
    float* column_out = out + column * rows;
    for (int64_t row = 0; row < rows; ++row) {
      column_out[row] = static_cast<float>(sketch_gaussian(stream, rows, row, column));
    }
  }
}

}  // namespace r2m
