// Native tests of the torch-free TIES and DARE cores (magnitude_histogram, ties_merge, dare_merge)
// on hand-computed cases.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "merge/dare_merge.h"
#include "merge/magnitude_histogram.h"
#include "merge/ties_merge.h"
#include "sketch/gaussian.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

void histogram_by_hand() {
  // |1 - 0| has bits 0x3F800000 and |-0.5 - 0| 0x3F000000: their top 16 bits below the sign,
  // bits [30, 15), are 0x7F00 and 0x7E00. Under the prefix 0x7F00 only 1.0 is left, with low
  // bits 0.
  const float base[] = {0.0f, 0.0f};
  const float expert[] = {1.0f, -0.5f};
  const void* experts[] = {expert};
  int64_t prefix = 0;
  std::vector<int64_t> counts(1 << 16, 0);
  const r2m::DareMask no_mask{nullptr, 0, 0, 1.0f};
  r2m::MagnitudeHistogramParams params{base,    experts, 1,  2,      r2m::ScalarKind::kFloat32,
                                       &prefix, 15,      16, no_mask};
  r2m::magnitude_histogram_cpu(params, 0, 2, counts.data());
  int64_t total = 0;
  for (int64_t count : counts) total += count;
  expect(counts[0x7F00] == 1 && counts[0x7E00] == 1 && total == 2, "histogram high digit");
  prefix = 0x7F00;
  std::vector<int64_t> low(1 << 15, 0);
  params.shift = 0;
  params.width = 15;
  r2m::magnitude_histogram_cpu(params, 0, 2, low.data());
  total = 0;
  for (int64_t count : low) total += count;
  expect(low[0] == 1 && total == 1, "histogram low digit under a prefix");
}

// Three task vectors on a zero base, for TIES by hand (tests/test_formulas.py's).
const float kBase[] = {0, 0, 0, 0};
const float kTask0[] = {3, -1, 0.5f, 2};
const float kTask1[] = {-2, 4, -1, -1};
const float kTask2[] = {1, -3, 2, -2};
const void* const kTasks[] = {kTask0, kTask1, kTask2};
const float kThresholds[] = {2, 2, 2};

void ties_by_hand() {
  // Per-tensor TIES at density 0.5: every task's threshold is 2, so the trimmed vectors are
  // [3, 0, 0, 2], [-2, 4, 0, 0], [0, -3, 2, -2]; sums [1, 1, 2, 0] elect +, +, +, + (0 counts
  // as +), and the agreeing means are [3, 4, 2, 2].
  float out[4];
  const r2m::DareMask no_mask{nullptr, 0, 0, 1.0f};
  r2m::ties_merge_cpu({kBase, kTasks, 3, 4, r2m::ScalarKind::kFloat32, kThresholds, 1.0f, no_mask},
                      0, 4, out);
  expect(out[0] == 3 && out[1] == 4 && out[2] == 2 && out[3] == 2, "ties_merge by hand");
}

void weighted_ties_by_hand() {
  // mergekit's TIES, thresholds 2, the third task keeping its tied entries only up to index 2:
  // trimmed [3, 0, 0, 2], [-2, 4, 0, 0], [0, -3, 2, 0]; weighted by 1, 0.5, 2: [3, 0, 0, 2],
  // [-1, 2, 0, 0], [0, -6, 4, 0]; sums [2, -4, 4, 2] elect +, -, +, +; agreeing sums
  // [3, -6, 4, 2] over agreeing weights [1, 2, 2, 1]: [3, -3, 2, 2].
  const int64_t cutoffs[] = {4, 4, 2};
  const float weights[] = {1.0f, 0.5f, 2.0f};
  float out[4];
  r2m::TiesWeightedParams params{kBase,       kTasks,  3,       4,    r2m::ScalarKind::kFloat32,
                                 kThresholds, cutoffs, weights, true, 1.0f};
  r2m::ties_merge_weighted_cpu(params, 0, 4, out);
  expect(out[0] == 3 && out[1] == -3 && out[2] == 2 && out[3] == 2, "weighted ties by hand");
  params.normalize = false;
  params.lam = 0.5f;
  r2m::ties_merge_weighted_cpu(params, 0, 4, out);
  expect(out[0] == 1.5f && out[1] == -3 && out[2] == 2 && out[3] == 1, "weighted ties, no norm");
  // A block starting at element 2 keeps the same entries (cutoffs are whole-tensor indices).
  params.normalize = true;
  params.lam = 1.0f;
  r2m::ties_merge_weighted_cpu(params, 2, 4, out);
  expect(out[2] == 2 && out[3] == 2, "weighted ties, a later block");
}

void dare_by_hand() {
  // drop_rate 0 keeps every entry: 1 + 0.5 * ((3 - 1) + (5 - 1)) = 4, and the probe is 0.
  const float base[] = {1};
  float e0[] = {3};
  const float e1[] = {5};
  const void* experts[] = {e0, e1};
  const uint64_t streams[] = {11, 12};
  float out[1];
  r2m::DareMergeParams params{base,    experts, 2, 1,    r2m::ScalarKind::kFloat32,
                              streams, 0,       0, 1.0f, 0.5f};
  expect(r2m::dare_merge_cpu(params, 0, 1, out) == 0.0f && out[0] == 4.0f, "dare keeps all");
  // A NaN input shows in the probe even where its entry is dropped (drop_rate near 1).
  e0[0] = NAN;
  params.mask.keep_from = r2m::dare_keep_from(0.999999);
  params.mask.keep_scale = static_cast<float>(1.0 - 0.999999);
  expect(std::isnan(r2m::dare_merge_cpu(params, 0, 1, out)), "dare probe sees a dropped NaN");
  // drop_rate 0.5 on 1000 entries: each is the base (dropped) or base + lam * 2 / 0.5 (kept),
  // kept exactly where the stream's uniform is >= 0.5.
  std::vector<float> zeros(1000, 0.0f), ones(1000, 1.0f), merged(1000);
  const void* one_expert[] = {ones.data()};
  r2m::DareMergeParams half{zeros.data(),
                            one_expert,
                            1,
                            1000,
                            r2m::ScalarKind::kFloat32,
                            {streams, 250, r2m::dare_keep_from(0.5), 0.5f},
                            1.0f};
  r2m::dare_merge_cpu(half, 0, 1000, merged.data());
  int kept = 0;
  for (int e = 0; e < 1000; ++e) {
    const bool want = r2m::splitmix64_uniform(streams[0], 250 + e) >= 0.5;
    expect(merged[e] == (want ? 2.0f : 0.0f), "dare mask by element index");
    kept += want ? 1 : 0;
  }
  expect(kept > 400 && kept < 600, "dare keeps about half");
}

void dare_integer_test_is_the_uniform_test() {
  // The kernels test a draw's 53 bits against dare_keep_from(p); the spec (and the reference)
  // tests the uniform bits * 2^-53 against p. They must agree for every p and every draw,
  // including draws exactly at p (p a multiple of 2^-53) and just either side of it.
  const double rates[] = {0.0, 0.1, 0.3, 0.5, 0.9, 0.999999, 1.0 - 0x1.0p-53, 3 * 0x1.0p-53};
  for (const double p : rates) {
    const uint64_t keep_from = r2m::dare_keep_from(p);
    for (uint64_t index = 0; index < 20000; ++index) {
      const uint64_t bits = r2m::splitmix64(12345, index) >> 11;
      const bool integer = bits >= keep_from;
      expect(integer == (static_cast<double>(bits) * 0x1.0p-53 >= p), "integer mask test");
    }
    for (const uint64_t bits : {keep_from - 1, keep_from, keep_from + 1}) {
      if (bits >= (uint64_t{1} << 53)) continue;
      expect((bits >= keep_from) == (static_cast<double>(bits) * 0x1.0p-53 >= p),
             "integer mask test at the boundary");
    }
  }
}

}  // namespace

int main() {
  histogram_by_hand();
  ties_by_hand();
  weighted_ties_by_hand();
  dare_by_hand();
  dare_integer_test_is_the_uniform_test();
  if (failures != 0) {
    std::printf("%d native check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("native TIES and DARE checks passed\n");
  return EXIT_SUCCESS;
}
