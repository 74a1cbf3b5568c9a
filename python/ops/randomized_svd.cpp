// randomized_svd: batched rank-r SVD by a seeded Gaussian sketch (Halko, Martinsson and Tropp
// 2011), composed of ATen products and small factorizations around the counter-based test matrix
// of csrc/sketch/gaussian.h. 16-bit inputs are factored in float32; Q and every product stay in
// float32 or float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <optional>
#include <tuple>

#include "sketch/gaussian.h"

#if defined(R2M_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

namespace r2m {
namespace {

// The transposed test matrix Omega^T [columns, rows] on the CPU, the threads splitting its
// columns (8 x 3072 x 84 took 8 ms of a 200 ms randomized_svd on one thread).
at::Tensor sketch_matrix_t(int64_t seed, int64_t key, int64_t rows, int64_t columns) {
  at::Tensor omega_t = at::empty({columns, rows}, at::kFloat);
  float* out = omega_t.data_ptr<float>();
  at::parallel_for(0, columns, 1, [&](int64_t begin, int64_t end) {
    sketch_columns_cpu(static_cast<uint64_t>(seed), static_cast<uint64_t>(key), rows, begin, end,
                       out);
  });
  return omega_t;
}

// Omega^T on the device of `like`: drawn there by the CUDA twin of the same generator.
at::Tensor sketch_matrix_t_like(const at::Tensor& like, int64_t seed, int64_t key, int64_t rows,
                                int64_t columns) {
#if defined(R2M_WITH_CUDA)
  if (like.is_cuda()) {
    const c10::cuda::CUDAGuard guard(like.device());
    at::Tensor omega = at::empty({rows, columns}, like.options().dtype(at::kFloat));
    const int error = sketch_matrix_cuda(
        static_cast<uint64_t>(seed), static_cast<uint64_t>(key), rows, columns,
        omega.data_ptr<float>(), at::cuda::getCurrentCUDAStream(like.device().index()).stream());
    TORCH_CHECK(error == 0, "randomized_svd (CUDA): sketch kernel launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(error)));
    return omega.mT().contiguous();
  }
#endif
  TORCH_CHECK(like.is_cpu(), "randomized_svd: no sketch generator for device ", like.device());
  return sketch_matrix_t(seed, key, rows, columns);
}

// Orthonormal basis of the columns of y [..., m, l] without any host synchronisation: shifted
// CholeskyQR3 (Fukaya, Kannan, Nakatsukasa, Yamamoto and Yanagisawa 2020). The first Cholesky
// factors Y^T Y + s I with s = 11 (m l + l (l + 1)) u ||Y||_F^2, which is positive definite for
// any Y, so it never fails and needs no check; two CholeskyQR rounds then restore orthogonality.
// All in float64. A floor of l * DBL_MIN on the shift keeps an all-zero Y finite (its Q is 0).
// Where Y is exactly rank deficient, the columns beyond its rank span rounding noise and need
// not come out orthonormal (no check can say so without a host synchronisation); they carry no
// direction of Y, so U S V^T is unaffected. Used on CUDA, where the CPU path's failure checks
// would stall the device, and tested on the CPU.
at::Tensor shifted_cholesky_qr3(const at::Tensor& y) {
  TORCH_CHECK(y.dim() >= 2 && y.size(-1) <= y.size(-2),
              "shifted_cholesky_qr3: y must be [..., m, l] with l <= m, got ", y.sizes());
  const int64_t m = y.size(-2);
  const int64_t l = y.size(-1);
  at::Tensor q = y.to(at::kDouble);
  const at::Tensor identity = at::eye(l, q.options());
  for (int round = 0; round < 3; ++round) {
    const at::Tensor gram = at::matmul(q.mT(), q);
    const double relative =
        round == 0 ? 11.0 * static_cast<double>(m * l + l * (l + 1)) * DBL_EPSILON : 0.0;
    const at::Tensor trace = gram.diagonal(0, -2, -1).sum(-1, /*keepdim=*/true).unsqueeze(-1);
    const at::Tensor shift = trace * relative + static_cast<double>(l) * DBL_MIN;
    const at::Tensor r =
        std::get<0>(at::linalg_cholesky_ex(gram + shift * identity, /*upper=*/true));
    q = at::linalg_solve_triangular(r, q, /*upper=*/true, /*left=*/false);
  }
  return q.to(y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// An orthonormal basis held as Q^T = F W: rows W [..., l, m] in the working precision and an
// l x l float64 factor F on their left (absent: the identity). CholeskyQR2 ends with the product
// Q^T = R2^-T Q1^T, one more GEMM over all m rows after the two Grams and the first round's;
// kept factored, F = R2^-T is applied on the l x l side instead: folded into the next
// orthonormalisation's first triangular factor (the next product is F (W A), whose Gram is
// F (W A)(W A)^T F^T) or into the l x l factors of the small SVD. The same products and the same
// basis up to rounding, one GEMM of 2 l^2 m flops fewer per orthonormalisation (8 x 84 x 768
// rows: 12 of 65 ms of randomized_svd went to these products).
struct FactoredRows {
  at::Tensor rows;
  std::optional<at::Tensor> left;
};

// factor x, for an optional l x l float64 factor (absent: the identity) and a float64 x.
at::Tensor times(const std::optional<at::Tensor>& factor, const at::Tensor& x) {
  return factor ? at::matmul(*factor, x) : x;
}

// Orthonormal rows spanning the rows of Y^T = F raw, raw [..., l, m] with l <= m, by CholeskyQR2:
// Q1^T = R1^-T Y^T with R1 the Cholesky factor of Y^T Y = F (raw raw^T) F^T, then R2 the Cholesky
// factor of Q1^T Q1 taken from the Q1 actually computed (so that the second round repairs the
// first's rounding), returned as FactoredRows{Q1^T, R2^-T}. Each R^-1 is an l x l triangular
// inverse (float64, cheap) applied by one matrix product in the working precision: a CPU GEMM runs
// several times faster than a triangular solve over all m rows. R2 near the identity says Q1 was
// nearly orthonormal, as it must be for the repair. raw raw^T is tried in the working precision
// first (enough while kappa(Y) stays below ~1e2: error ~ u kappa^2), kept when Q1 comes out
// orthonormal to 1e-3, then in float64 (stable far beyond float32's kappa ~ 4e3; measured:
// orthogonal to 3e-7 in float32 up to kappa(Y) = 1e9), then Householder QR of the explicit Y when
// even that Cholesky fails (a rank-deficient sketch) or R2 strays from the identity. Measured on
// 8 x 3072 x 84 (2-core CPU, unfactored): 14.7 ms with the float64 Gram, Householder 24.8 ms,
// with triangular solves 31.9 ms.
FactoredRows orthonormal_rows(const at::Tensor& raw, const std::optional<at::Tensor>& left) {
  const int64_t l = raw.size(-2);
  const at::Tensor identity = at::eye(l, raw.options().dtype(at::kDouble));
  // (R^-1)^T, to apply as Q^T = R^-T Y^T.
  auto inverse_factor_t = [&](const at::Tensor& gram) -> std::optional<at::Tensor> {
    auto [r, info] = at::linalg_cholesky_ex(gram, /*upper=*/true);
    if (!info.eq(0).all().item<bool>()) return std::nullopt;
    return at::linalg_solve_triangular(r, identity, /*upper=*/true, /*left=*/true).mT();
  };
  // With max_q1_error, Q1 is kept only when Q1^T Q1 is that close to the identity (entrywise).
  auto cholesky_qr2 = [&](const at::Tensor& raw_gram64,
                          std::optional<double> max_q1_error) -> std::optional<FactoredRows> {
    // F G F^T (G symmetric); without F, G itself, not a transpose of a GEMM's nearly symmetric
    // result.
    const at::Tensor gram64 = left ? times(left, times(left, raw_gram64).mT()) : raw_gram64;
    auto r1_inverse_t = inverse_factor_t(gram64);
    if (!r1_inverse_t) return std::nullopt;
    const at::Tensor first_factor = left ? at::matmul(*r1_inverse_t, *left) : *r1_inverse_t;
    const at::Tensor q1t = at::matmul(first_factor.to(raw.scalar_type()), raw);
    const at::Tensor q1_gram = at::matmul(q1t, q1t.mT()).to(at::kDouble);
    if (max_q1_error && (q1_gram - identity).abs().amax().item<double>() > *max_q1_error) {
      return std::nullopt;
    }
    auto r2_inverse_t = inverse_factor_t(q1_gram);
    if (!r2_inverse_t) return std::nullopt;
    const bool near_identity =
        (r2_inverse_t->diagonal(0, -2, -1) - 1).abs().amax().item<double>() <= 1e-2;
    if (!near_identity) return std::nullopt;
    return FactoredRows{q1t, *r2_inverse_t};
  };
  if (raw.scalar_type() != at::kDouble) {
    // Kept only with Q1 orthonormal to 1e-3: R1 was then about as good as a float64 Gram's, and
    // the second round starts from where the float64 path's would.
    if (auto q = cholesky_qr2(at::matmul(raw, raw.mT()).to(at::kDouble), 1e-3)) return *q;
  }
  const at::Tensor raw64 = raw.to(at::kDouble);
  if (auto q = cholesky_qr2(at::matmul(raw64, raw64.mT()), std::nullopt)) return *q;
  const at::Tensor y = left ? at::matmul(left->to(raw.scalar_type()), raw) : raw;
  return {std::get<0>(at::linalg_qr(y.mT(), "reduced")).mT().contiguous(), std::nullopt};
}

// One CholeskyQR round in float64 of nearly orthonormal columns x [..., m, k]: X^T X is near the
// identity, so its Cholesky factor exists and the round needs no check (no host synchronisation).
at::Tensor cholesky_qr_round(const at::Tensor& x) {
  const at::Tensor x64 = x.to(at::kDouble);
  const at::Tensor r =
      std::get<0>(at::linalg_cholesky_ex(at::matmul(x64.mT(), x64), /*upper=*/true));
  return at::linalg_solve_triangular(r, x64, /*upper=*/true, /*left=*/false).to(x.scalar_type());
}

// The same on a device, by shifted CholeskyQR3 (no host synchronisation); its [m, l] layout is
// read and returned through transposed views, which GPU GEMMs take at no cost.
at::Tensor shifted_cholesky_qr3_rows(const at::Tensor& yt) {
  return shifted_cholesky_qr3(yt.mT()).mT();
}

// SVD of square float64 matrices r [..., l, l] on the CPU, one matrix per thread: ATen's batched
// SVD factors one matrix after another (8 x 84 x 84 on a 2-core CPU: 7.0-8.0 ms batched). Each
// matrix is factored alone, so the bits do not depend on how the batch is split.
std::tuple<at::Tensor, at::Tensor, at::Tensor> small_svd_cpu(const at::Tensor& r) {
  const int64_t l = r.size(-1);
  const at::Tensor flat = r.reshape({-1, l, l});
  const int64_t count = flat.size(0);
  at::Tensor u = at::empty_like(flat);
  at::Tensor s = at::empty({count, l}, flat.options());
  at::Tensor vh = at::empty_like(flat);
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto [ui, si, vhi] = at::linalg_svd(flat[i], /*full_matrices=*/false);
      u[i].copy_(ui);
      s[i].copy_(si);
      vh[i].copy_(vhi);
    }
  });
  std::vector<int64_t> square(r.sizes().begin(), r.sizes().end());
  std::vector<int64_t> values(r.sizes().begin(), r.sizes().end() - 1);
  return {u.view(square), s.view(values), vh.view(square)};
}

// Rank-`kept` SVD of A ~ Q B from the range basis Q^T = q.left q.rows [..., l, m] and b_raw =
// q.rows A [..., l, n] (so B = Q^T A = q.left b_raw), through an orthonormal basis P of B's rows:
// B = R P with R = B P^T [l, l], R = W S Z^T, so A ~ (Q W) S (P^T Z)^T. The wide [l, n]
// factorization becomes CholeskyQR2 (GEMMs) and an l x l SVD instead of LAPACK's SVD of B
// (8 x 3072 x 84 on a 2-core CPU: 26-50 ms alone); the whole op on 8 x 768 x 3072 went from 221 to
// 201 ms, on 8 x 768 x 768 from 73 to 61 ms. R is formed as B P^T, not taken from the Cholesky
// factors, so B = R P holds to rounding whatever P's conditioning was. The l x l factors of Q^T
// and P^T are applied to l x l matrices only: R = F_q (b_raw p.rows^T) F_p^T, U = q.rows^T
// (F_q^T W), V = p.rows^T (F_p^T Z).
std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_of_wide(const FactoredRows& q,
                                                           const at::Tensor& b_raw, int64_t kept) {
  const FactoredRows p = orthonormal_rows(b_raw, q.left);
  const at::Tensor r_raw = at::matmul(b_raw, p.rows.mT()).to(at::kDouble);
  auto [w, s, z_t] = small_svd_cpu(times(q.left, times(p.left, r_raw.mT()).mT()));
  const at::ScalarType work = b_raw.scalar_type();
  // U = Q W and V = P^T Z, each formed by one product straight into its [.., rows, kept] layout.
  auto transposed = [](const std::optional<at::Tensor>& factor) -> std::optional<at::Tensor> {
    return factor ? std::optional<at::Tensor>(factor->mT()) : std::nullopt;
  };
  at::Tensor u = at::matmul(q.rows.mT(), times(transposed(q.left), w.narrow(-1, 0, kept)).to(work));
  at::Tensor v =
      at::matmul(p.rows.mT(), times(transposed(p.left), z_t.narrow(-2, 0, kept).mT()).to(work));
  return {u, s.narrow(-1, 0, kept).to(work), v};
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
  // Bases are kept transposed, as Q^T [..., l, m] with rows contiguous (and so the sketch as
  // Omega^T): every product with A then has the thin factor on the left (Q^T A, Z^T A^T), which
  // CPU GEMMs run faster than A Z or A^T Q with a thin right factor (8 x 3072 x 768 times 84
  // columns on a 2-core CPU: 132-153 vs 112-128 GFLOP/s), and the orthonormalisation's products
  // are R^-T Q^T. The same operations and subspaces as the textbook column form.
  const at::Tensor omega_t = sketch_matrix_t_like(matrix, seed, key, n, width).to(matrix.options());
  at::Tensor u, s, v;
  if (matrix.is_cpu()) {
    // CholeskyQR2 with its checks and Householder fallback, each basis kept factored.
    FactoredRows q = orthonormal_rows(at::matmul(omega_t, matrix.mT()), std::nullopt);
    for (int64_t i = 0; i < n_iter; ++i) {
      const FactoredRows z = orthonormal_rows(at::matmul(q.rows, matrix), q.left);  // co-range
      q = orthonormal_rows(at::matmul(z.rows, matrix.mT()), z.left);
    }
    std::tie(u, s, v) = svd_of_wide(q, at::matmul(q.rows, matrix), kept);
  } else {
    // A device must not wait for checks: shifted CholeskyQR3, explicit bases.
    at::Tensor q_t = shifted_cholesky_qr3_rows(at::matmul(omega_t, matrix.mT()));
    for (int64_t i = 0; i < n_iter; ++i) {
      const at::Tensor z_t = shifted_cholesky_qr3_rows(at::matmul(q_t, matrix));  // co-range
      q_t = shifted_cholesky_qr3_rows(at::matmul(z_t, matrix.mT()));
    }
    const at::Tensor b_t = at::matmul(q_t, matrix);  // B = Q^T A, [..., l, n]
    // The small SVD of B is taken of its tall transpose: A^T Q = V S W^T gives B = W S V^T, so
    // U = Q W.
    auto [v_small, s_small, w_t] = at::linalg_svd(b_t.mT(), /*full_matrices=*/false);
    // cuSOLVER's batched Jacobi SVD leaves its float32 factors orthonormal only to ~1e-5 (seen
    // 1.03e-5 for V on an H200); one CholeskyQR round in float64 brings them to rounding.
    u = cholesky_qr_round(at::matmul(w_t.narrow(-2, 0, kept), q_t).mT());
    v = cholesky_qr_round(v_small.narrow(-1, 0, kept));
    s = s_small.narrow(-1, 0, kept);
  }
  return {u.contiguous(), s.contiguous(), v.contiguous()};
}

at::Tensor sketch_matrix_op(int64_t seed, int64_t key, int64_t rows, int64_t columns) {
  TORCH_CHECK(rows >= 0 && columns >= 0, "sketch_matrix: sizes must be >= 0, got ", rows, " x ",
              columns);
  return sketch_matrix_t(seed, key, rows, columns).mT().contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(r2m_ext, CPU, m) { m.impl("randomized_svd", &randomized_svd); }

#if defined(R2M_WITH_CUDA)
TORCH_LIBRARY_IMPL(r2m_ext, CUDA, m) { m.impl("randomized_svd", &randomized_svd); }
#endif

TORCH_LIBRARY_IMPL(r2m_ext, CompositeExplicitAutograd, m) {
  m.impl("sketch_matrix", &sketch_matrix_op);
  m.impl("shifted_cholesky_qr3", &shifted_cholesky_qr3);
}

}  // namespace r2m
