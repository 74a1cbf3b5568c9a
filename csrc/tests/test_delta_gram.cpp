// Native test of the torch-free delta_gram core against a hand-computed case and a direct
// long-double loop, for every input kind.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "merge/delta_gram.h"

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s: got %.17g want %.17g\n", what, got, want);
    ++failures;
  }
}

void hand_case() {
  // base = (1, 2, 3); experts (2, 2, 3) and (1, 4, 6): task vectors (1, 0, 0) and (0, 2, 3),
  // so G = [[1, 0], [0, 13]].
  const float base[] = {1, 2, 3};
  const float e0[] = {2, 2, 3};
  const float e1[] = {1, 4, 6};
  const void* experts[] = {e0, e1};
  r2m::DeltaGramParams params{base, experts, 2, 3, r2m::ScalarKind::kFloat32};
  double gram[4] = {0, 0, 0, 0};
  r2m::delta_gram_cpu(params, gram);
  expect_near(gram[0], 1, 0, "hand G00");
  expect_near(gram[1], 0, 0, "hand G01");
  expect_near(gram[2], 0, 0, "hand G10");
  expect_near(gram[3], 13, 0, "hand G11");
}

void half_kinds() {
  // 1.5 is exact in bf16 (0x3FC0) and fp16 (0x3E00); 0 is 0x0000 in both. One expert, one
  // element: G = 1.5^2.
  const uint16_t zero = 0;
  const uint16_t bf16_one_and_half = 0x3FC0;
  const uint16_t fp16_one_and_half = 0x3E00;
  const void* bf16_experts[] = {&bf16_one_and_half};
  const void* fp16_experts[] = {&fp16_one_and_half};
  double gram = 0;
  r2m::delta_gram_cpu({&zero, bf16_experts, 1, 1, r2m::ScalarKind::kBFloat16}, &gram);
  expect_near(gram, 2.25, 0, "bf16");
  gram = 0;
  r2m::delta_gram_cpu({&zero, fp16_experts, 1, 1, r2m::ScalarKind::kFloat16}, &gram);
  expect_near(gram, 2.25, 0, "fp16");
  // Smallest fp16 subnormal, 2^-24.
  const uint16_t fp16_min_subnormal = 0x0001;
  expect_near(r2m::fp16_bits_to_float(fp16_min_subnormal), std::ldexp(1.0, -24), 0,
              "fp16 subnormal");
}

void random_against_loop() {
  // Spans several reduction blocks, with a ragged last block.
  const int64_t numel = 3 * r2m::kDeltaGramBlock + 17;
  const int64_t n = 3;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> base(numel);
  std::vector<std::vector<double>> experts(n, std::vector<double>(numel));
  for (auto& x : base) x = normal(rng);
  for (auto& expert : experts)
    for (int64_t e = 0; e < numel; ++e) expert[e] = base[e] + 0.01 * normal(rng);
  std::vector<const void*> pointers;
  for (auto& expert : experts) pointers.push_back(expert.data());
  std::vector<double> gram(n * n, 0.0);
  r2m::delta_gram_cpu({base.data(), pointers.data(), n, numel, r2m::ScalarKind::kFloat64},
                      gram.data());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      long double want = 0;
      for (int64_t e = 0; e < numel; ++e)
        want += static_cast<long double>(experts[i][e] - base[e]) * (experts[j][e] - base[e]);
      expect_near(gram[i * n + j], static_cast<double>(want), 1e-12, "random G");
    }
  }
}

}  // namespace

int main() {
  hand_case();
  half_kinds();
  random_against_loop();
  if (failures != 0) {
    std::printf("%d native check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("native delta_gram checks passed\n");
  return EXIT_SUCCESS;
}
