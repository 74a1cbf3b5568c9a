// randomized_svd: batched rank-r SVD by a seeded Gaussian sketch (Halko, Martinsson and Tropp
// 2011), composed of ATen products and small factorizations around the counter-based test matrix
// of csrc/sketch/gaussian.h. 16-bit inputs are factored in float32; Q and every product stay in
// float32 or float64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "sketch/gaussian.h"

namespace r2m {
namespace {

at::Tensor sketch_matrix(int64_t seed, int64_t key, int64_t rows, int64_t columns) {
  at::Tensor omega = at::empty({rows, columns}, at::kFloat);
  sketch_matrix_cpu(static_cast<uint64_t>(seed), static_cast<uint64_t>(key), rows, columns,
                    omega.data_ptr<float>());
  return omega;
}

// Orthonormal basis of the columns of y [..., m, l], l <= m. CholeskyQR2: two rounds of
// Q <- Q R^-1 with R the Cholesky factor of Q^T Q formed in float64, which makes them
// GEMM-bound and stable far beyond float32's kappa ~ 4e3 limit. Householder QR when the Gram
// is not positive definite (a rank-deficient sketch) or the result is not orthonormal.
at::Tensor orthonormal_basis(const at::Tensor& y) {
  at::Tensor q = y;
  bool factored = true;
  for (int round = 0; round < 2 && factored; ++round) {
    const at::Tensor q64 = q.to(at::kDouble);
    auto [upper, info] = at::linalg_cholesky_ex(at::matmul(q64.mT(), q64), /*upper=*/true);
    factored = info.eq(0).all().item<bool>();
    if (factored) {
      q = at::linalg_solve_triangular(upper, q64, /*upper=*/true, /*left=*/false)
              .to(y.scalar_type());
    }
  }
  if (factored) {
    const at::Tensor identity = at::eye(y.size(-1), q.options());
    const double loss = (at::matmul(q.mT(), q) - identity).abs().amax().item<double>();
    const double tolerance = y.scalar_type() == at::kDouble ? 1e-12 : 1e-6;
    if (loss <= tolerance) return q;
  }
  return std::get<0>(at::linalg_qr(y, "reduced"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd(const at::Tensor& a, int64_t rank,
                                                              int64_t oversample, int64_t n_iter,
                                                              int64_t seed, int64_t key) {
  TORCH_CHECK(a.dim() >= 2, "randomized_svd: a must be [..., m, n], got ", a.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "randomized_svd: a must be floating, got ",
              a.scalar_type());
  TORCH_CHECK(rank >= 1, "randomized_svd: rank must be >= 1, got ", rank);
  TORCH_CHECK(oversample >= 0 && n_iter >= 0,
              "randomized_svd: oversample and n_iter must be "
              ">= 0, got ",
              oversample, " and ", n_iter);
  const int64_t m = a.size(-2);
  const int64_t n = a.size(-1);
  const at::ScalarType work = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor matrix = a.to(work);
  const int64_t width = std::min({rank + oversample, m, n});
  const int64_t kept = std::min(rank, width);
  std::vector<int64_t> batch(a.sizes().begin(), a.sizes().end() - 2);
  if (width == 0 || matrix.numel() == 0) {
    auto shape = [&](std::initializer_list<int64_t> tail) {
      std::vector<int64_t> s = batch;
      s.insert(s.end(), tail);
      return s;
    };
    return {at::zeros(shape({m, kept}), matrix.options()),
            at::zeros(shape({kept}), matrix.options()),
            at::zeros(shape({n, kept}), matrix.options())};
  }
  const at::Tensor omega = sketch_matrix(seed, key, n, width).to(matrix.options());
  at::Tensor q = orthonormal_basis(at::matmul(matrix, omega));
  for (int64_t i = 0; i < n_iter; ++i) {
    q = orthonormal_basis(at::matmul(matrix, orthonormal_basis(at::matmul(matrix.mT(), q))));
  }
  auto [u_small, s, vh] = at::linalg_svd(at::matmul(q.mT(), matrix), /*full_matrices=*/false);
  return {at::matmul(q, u_small.narrow(-1, 0, kept)).contiguous(),
          s.narrow(-1, 0, kept).contiguous(), vh.narrow(-2, 0, kept).mT().contiguous()};
}

at::Tensor sketch_matrix_op(int64_t seed, int64_t key, int64_t rows, int64_t columns) {
  TORCH_CHECK(rows >= 0 && columns >= 0, "sketch_matrix: sizes must be >= 0, got ", rows, " x ",
              columns);
  return sketch_matrix(seed, key, rows, columns);
}

}  // namespace

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) { m.impl("randomized_svd", &randomized_svd); }

TORCH_LIBRARY_IMPL(r2m_ext, CompositeExplicitAutograd, m) {
  m.impl("sketch_matrix", &sketch_matrix_op);
}

}  // namespace r2m
