// DARE's mask (../shared/r2m-spec.md §6), shared by dare_merge, magnitude_histogram and
// ties_merge: entry `index` of task i is kept when the SplitMix64 uniform of (streams[i], index)
// is >= drop_rate, and then rescaled by 1 / (1 - drop_rate). A pure function of (stream, element
// index), so any block of a tensor draws what the whole tensor would, on any thread or device.
#pragma once

#include <cstdint>

#include "common/scalar.h"
#include "sketch/gaussian.h"

namespace r2m {

struct DareMask {
  const uint64_t* streams;  // one per expert; nullptr: no mask (every entry kept as it is)
  int64_t first_index;      // the tensor's element index of the block's first element
  double drop_rate;
  float keep_scale;  // 1 - drop_rate, rounded to float32 as the task vectors are divided by it
};

// Task `task`'s value at the tensor's element `index` after the mask: rescaled or 0.
R2M_HOST_DEVICE float dare_masked(const DareMask& mask, int64_t task, uint64_t index, float value) {
  return splitmix64_uniform(mask.streams[task], index) >= mask.drop_rate ? value / mask.keep_scale
                                                                         : 0.0f;
}

}  // namespace r2m
