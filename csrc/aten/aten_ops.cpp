// Device-generic ATen parts: the inverse factor and the argument checks of the ext_* operators.
#include "aten_ops.h"

#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/mm.h>

#include "../core/rules.h"

namespace sgk_aten {

namespace {

constexpr int64_t kTriLeaf = 256;  // below this, plain GEMMs / a triangular solve against I beat the recursion

int64_t split_point(int64_t n) { return ((n / 2 + 63) / 64) * 64; }

// out = T @ M with T upper triangular (n, n), M (n, k): recursively, so that about half of a GEMM's work is done
void trmm_left_upper(const at::Tensor& T, const at::Tensor& M, at::Tensor out) {
  const int64_t n = T.size(0);
  if (n <= kTriLeaf) {
    at::mm_out(out, T, M);
    return;
  }
  const int64_t h = split_point(n);
  at::Tensor top = out.slice(0, 0, h);
  trmm_left_upper(T.slice(0, 0, h).slice(1, 0, h), M.slice(0, 0, h), top);
  top.addmm_(T.slice(0, 0, h).slice(1, h, n), M.slice(0, h, n));
  trmm_left_upper(T.slice(0, h, n).slice(1, h, n), M.slice(0, h, n), out.slice(0, h, n));
}

// out = M @ T with T upper triangular (n, n), M (k, n)
void trmm_right_upper(const at::Tensor& M, const at::Tensor& T, at::Tensor out) {
  const int64_t n = T.size(0);
  if (n <= kTriLeaf) {
    at::mm_out(out, M, T);
    return;
  }
  const int64_t h = split_point(n);
  at::Tensor right = out.slice(1, h, n);
  trmm_right_upper(M.slice(1, 0, h), T.slice(0, 0, h).slice(1, 0, h), out.slice(1, 0, h));
  trmm_right_upper(M.slice(1, h, n), T.slice(0, h, n).slice(1, h, n), right);
  right.addmm_(M.slice(1, 0, h), T.slice(0, 0, h).slice(1, h, n));
}

// out (zero below the diagonal on entry) = R^-1 for R upper triangular:
// [A B; 0 C]^-1 = [A^-1, -A^-1 B C^-1; 0, C^-1]
void tri_inverse_into(const at::Tensor& R, at::Tensor out) {
  const int64_t n = R.size(0);
  if (n <= kTriLeaf) {
    out.copy_(at::linalg_solve_triangular(R, at::eye(n, R.options()), /*upper=*/true));
    return;
  }
  const int64_t h = split_point(n);
  at::Tensor Ai = out.slice(0, 0, h).slice(1, 0, h);
  at::Tensor Ci = out.slice(0, h, n).slice(1, h, n);
  tri_inverse_into(R.slice(0, 0, h).slice(1, 0, h), Ai);
  tri_inverse_into(R.slice(0, h, n).slice(1, h, n), Ci);
  at::Tensor AiB = at::empty({h, n - h}, R.options());
  trmm_left_upper(Ai, R.slice(0, 0, h).slice(1, h, n), AiB);
  at::Tensor X = out.slice(0, 0, h).slice(1, h, n);
  trmm_right_upper(AiB, Ci, X);
  X.neg_();
}

}  // namespace

at::Tensor upper_triangular_inverse(const at::Tensor& R) {
  TORCH_CHECK(R.dim() == 2 && R.size(0) == R.size(1), "upper_triangular_inverse: R must be square");
  at::Tensor out = at::zeros(R.sizes(), R.options());
  tri_inverse_into(R, out);
  return out;
}

void check_factor_args(const at::Tensor& H, double damp, const char* name) {
  TORCH_CHECK(H.dim() == 2 && H.size(0) == H.size(1), name, ": H must be square, got ", H.sizes());
  TORCH_CHECK(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble, name,
              ": H must be float32 or float64, got ", H.scalar_type());
  TORCH_CHECK(sgk::valid_damp(damp), name, ": damp must be finite and > 0, got ", damp);
}

std::tuple<at::Tensor, at::Tensor> inverse_factor(const at::Tensor& H, double damp) {
  check_factor_args(H, damp, "ext_inverse_factor");
  const int64_t c = H.size(0);
  if (c == 0) return {at::empty({0, 0}, H.options()), at::zeros({}, H.options().dtype(at::kInt))};
  at::Tensor Hd = H.clone(at::MemoryFormat::Contiguous);
  at::Tensor diag = Hd.diagonal();
  diag.masked_fill_(diag.eq(0), 1);
  diag.add_(diag.mean().mul(damp));
  // J H J = L L^T  =>  H = R R^T with R = J L J upper triangular  =>  H^-1 = U^T U with U = R^-1
  auto [L, info] = at::linalg_cholesky_ex(Hd.flip({0, 1}));
  at::Tensor R = L.flip({0, 1});
  at::Tensor U = upper_triangular_inverse(R).contiguous();
  at::Tensor bad = at::logical_or(U.isfinite().all().logical_not(), U.diagonal().le(0).any());
  at::Tensor status = info.to(at::kInt).masked_fill(at::logical_and(info.eq(0), bad), -1);
  return {U, status};
}

void check_nm_args(const at::Tensor& scores, int64_t n, int64_t m) {
  TORCH_CHECK(sgk::valid_nm(n, m), "ext_nm_keep_mask: N:M needs 0 < N < M, got ", n, ":", m);
  TORCH_CHECK(scores.dim() >= 1, "ext_nm_keep_mask: scores must have at least one dimension");
  TORCH_CHECK(scores.size(-1) % m == 0, "ext_nm_keep_mask: last dimension ", scores.size(-1),
              " is not a multiple of M=", m);
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "ext_nm_keep_mask: scores must be float32 or float64, got ", scores.scalar_type());
}

void check_unstructured_mask_args(const at::Tensor& scores, double sparsity, int64_t block_size) {
  TORCH_CHECK(scores.dim() == 2, "ext_unstructured_keep_mask: scores must be 2-D (rows, cols), got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "ext_unstructured_keep_mask: scores must be float32 or float64, got ", scores.scalar_type());
  TORCH_CHECK(sgk::valid_sparsity(sparsity), "ext_unstructured_keep_mask: sparsity must be in [0, 1), got ",
              sparsity);
  TORCH_CHECK(block_size >= 1, "ext_unstructured_keep_mask: block_size must be >= 1, got ", block_size);
}

void check_sweep_args(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                      int64_t block_size, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size,
                      const char* name) {
  TORCH_CHECK(W.dim() == 2, name, ": W must be 2-D (rows, cols), got ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
              name, ": W must be float32 or float64, got ", W.scalar_type());
  TORCH_CHECK(W.is_contiguous(), name, ": W must be contiguous");
  const int64_t rows = W.size(0), cols = W.size(1);
  TORCH_CHECK(U.dim() == 2 && U.size(0) == cols && U.size(1) == cols, name, ": the factor must be (", cols,
              ", ", cols, "), got ", U.sizes());
  TORCH_CHECK(U.scalar_type() == W.scalar_type(), name, ": factor dtype ", U.scalar_type(), " != W dtype ",
              W.scalar_type());
  TORCH_CHECK(U.device() == W.device(), name, ": the factor is on ", U.device(), " but W is on ", W.device());
  TORCH_CHECK(block_size >= 1, name, ": block_size must be >= 1, got ", block_size);
  if (m != 0) {
    TORCH_CHECK(sgk::valid_nm(n, m), name, ": N:M needs 0 < N < M, got ", n, ":", m);
    TORCH_CHECK(cols % m == 0, name, ": cols=", cols, " is not a multiple of M=", m);
    TORCH_CHECK(std::min(block_size, cols) % m == 0, name, ": block_size=", block_size,
                " is not a multiple of M=", m);
  } else {
    TORCH_CHECK(n == 0, name, ": n must be 0 when m is 0 (unstructured)");
    TORCH_CHECK(sgk::valid_sparsity(sparsity), name, ": sparsity must be in [0, 1), got ", sparsity);
  }
  TORCH_CHECK(scale.has_value() == zero.has_value(), name, ": quantization needs both scale and zero");
  if (scale.has_value()) {
    TORCH_CHECK(group_size >= 1 && cols % group_size == 0, name, ": group_size=", group_size,
                " must be >= 1 and divide cols=", cols);
    TORCH_CHECK(sgk::valid_maxq(maxq), name, ": maxq must be 2^bits - 1 for bits in ", sgk::kMinQuantBits, "..",
                sgk::kMaxQuantBits, ", got ", maxq);
    for (const at::Tensor* t : {&*scale, &*zero}) {
      TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == cols / group_size,
                  name, ": scale/zero must be (", rows, ", ", cols / group_size, "), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == W.scalar_type(), name, ": scale/zero dtype must match W");
      TORCH_CHECK(t->device() == W.device(), name, ": scale/zero must be on W's device");
    }
  }
}

}  // namespace sgk_aten
