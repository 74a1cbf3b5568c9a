// DARE's mask (../shared/r2m-spec.md §6), shared by dare_merge, magnitude_histogram and
// ties_merge: entry `index` of task i is kept when the SplitMix64 uniform of (streams[i], index)
// is >= drop_rate, and then rescaled by 1 / (1 - drop_rate). A pure function of (stream, element
// index), so any block of a tensor draws what the whole tensor would, on any thread or device.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/scalar.h"
#include "sketch/gaussian.h"

namespace r2m {

struct DareMask {
  const uint64_t* streams;  // one per expert; nullptr: no mask (every entry kept as it is)
  int64_t first_index;      // the tensor's element index of the block's first element
  uint64_t keep_from;       // dare_keep_from(drop_rate)
  float keep_scale;  // 1 - drop_rate, rounded to float32 as the task vectors are divided by it
};

// The uniform's test `bits * 2^-53 >= drop_rate` on its 53 bits as integers: the product is
// exact, so it holds exactly when bits >= drop_rate * 2^53 (also exact), i.e. bits >= the ceiling.
// Integer compares keep the mask's loops free of 64-bit integer-to-double conversions, which
// x86 vector units lack below AVX-512DQ.
inline uint64_t dare_keep_from(double drop_rate) {
  return static_cast<uint64_t>(std::ceil(std::ldexp(drop_rate, 53)));
}

// Task `task`'s value at the tensor's element `index` after the mask: rescaled or 0.
R2M_HOST_DEVICE float dare_masked(const DareMask& mask, int64_t task, uint64_t index, float value) {
  const uint64_t bits = splitmix64(mask.streams[task], index) >> 11;
  return bits >= mask.keep_from ? value / mask.keep_scale : 0.0f;
}

}  // namespace r2m
