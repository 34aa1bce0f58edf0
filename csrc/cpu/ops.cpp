// The sparsegpt_kernels::ext_* operators: schemas, CPU implementations (on the torch-free core in csrc/core) and
// shape-only Meta implementations (used by FakeTensor / torch.compile / opcheck).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

#include "../core/sweep_core.h"
#include "aten_ops.h"

namespace {

at::Tensor nm_keep_mask_cpu(const at::Tensor& scores, int64_t n, int64_t m) {
  sgk_aten::check_nm_args(scores, n, m);
  TORCH_CHECK(scores.device().is_cpu(), "ext_nm_keep_mask (CPU): scores must be a CPU tensor");
  const at::Tensor s = scores.contiguous();
  at::Tensor keep = at::empty(s.sizes(), s.options().dtype(at::kBool));
  const int64_t cols = s.size(-1);
  const int64_t rows = cols ? s.numel() / cols : 0;
  auto* out = reinterpret_cast<uint8_t*>(keep.data_ptr());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "ext_nm_keep_mask", [&] {
    const scalar_t* in = s.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) {
      sgk::nm_keep_mask(in + b * cols, e - b, cols, n, m, out + b * cols);
    });
  });
  return keep;
}

// out = J (H with dead columns fixed and damping added) J, J the index reversal (the reference's damped_hessian).
template <typename T>
void damped_reversed(const at::Tensor& H, double damp, at::Tensor& out) {
  const int64_t c = H.size(0);
  const T* h = H.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  double sum = 0.0;
  for (int64_t i = 0; i < c; ++i) {
    const T d = h[i * c + i];
    sum += d == T(0) ? 1.0 : static_cast<double>(d);
  }
  const T lam = static_cast<T>(damp * (sum / static_cast<double>(c)));
  at::parallel_for(0, c, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* src = h + (c - 1 - i) * c + (c - 1);  // row c-1-i, read backwards
      T* dst = o + i * c;
      for (int64_t j = 0; j < c; ++j) dst[j] = src[-j];
      const T d = dst[i];
      dst[i] = (d == T(0) ? T(1) : d) + lam;
    }
  });
}

// R from U', the upper Cholesky factor of J Hd J (J Hd J = U'^T U'), which ATen returns column-major: with
// L = U'^T, R = J L J is upper triangular with Hd = R R^T, and R_ij = U'_{c-1-j, c-1-i}, i.e. R in row-major order
// is U's buffer read backwards (a streaming pass, no transpose). Returns false when R has a non-finite entry or a
// non-positive diagonal.
template <typename T>
bool reversed_factor(const at::Tensor& Up, at::Tensor& R) {
  const int64_t c = Up.size(0);
  TORCH_INTERNAL_ASSERT(Up.stride(0) == 1 && Up.stride(1) == c, "expected a column-major Cholesky factor");
  const T* u = Up.const_data_ptr<T>() + (c * c - 1);
  T* r = R.mutable_data_ptr<T>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, c, 64, [&](int64_t b, int64_t e) {
    bool good = true;
    for (int64_t i = b; i < e; ++i) {
      const T* src = u - i * c;  // r[i * c + j] = u[c*c - 1 - (i * c + j)]
      T* dst = r + i * c;
      std::fill(dst, dst + i, T(0));
      good = good && src[-i] > T(0);
      for (int64_t j = i; j < c; ++j) {
        const T x = src[-j];
        good = good && std::isfinite(x);
        dst[j] = x;
      }
    }
    if (!good) ok.store(false);
  });
  return ok.load();
}

std::tuple<at::Tensor, at::Tensor> cholesky_factor_cpu(const at::Tensor& H, double damp) {
  sgk_aten::check_factor_args(H, damp, "ext_cholesky_factor");
  TORCH_CHECK(H.device().is_cpu(), "ext_cholesky_factor (CPU): H must be a CPU tensor");
  const int64_t c = H.size(0);
  at::Tensor R = at::empty({c, c}, H.options());
  if (c == 0) return {R, at::zeros({}, H.options().dtype(at::kInt))};
  const at::Tensor Hc = H.contiguous();
  at::Tensor Hd = at::empty({c, c}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "ext_cholesky_factor", [&] { damped_reversed<scalar_t>(Hc, damp, Hd); });
  auto [Up, info] = at::linalg_cholesky_ex(Hd, /*upper=*/true);
  int32_t status = info.item<int32_t>();
  if (status == 0) {
    const at::Tensor Uc = Up.stride(0) == 1 && Up.stride(1) == c ? Up : Up.t().contiguous().t();
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "ext_cholesky_factor", [&] { ok = reversed_factor<scalar_t>(Uc, R); });
    if (!ok) status = -1;
  }
  return {R, at::scalar_tensor(status, H.options().dtype(at::kInt))};
}

// The sweep on either factor (see sgk::Factor). kCholesky keeps its lazy updates in a scratch buffer of W's shape.
at::Tensor sweep_cpu_impl(const at::Tensor& W, const at::Tensor& G, double sparsity, int64_t n, int64_t m,
                          int64_t block_size, const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size,
                          sgk::Factor factor, const char* name) {
  sgk_aten::check_sweep_args(W, G, sparsity, n, m, block_size, scale, zero, maxq, group_size);
  TORCH_CHECK(W.device().is_cpu(), name, " (CPU): W must be a CPU tensor");
  const at::Tensor Gc = G.contiguous();
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor zc = zero.has_value() ? zero->contiguous() : at::Tensor();
  const int64_t rows = W.size(0), cols = W.size(1);
  const bool chol = factor == sgk::Factor::kCholesky;
  const at::Tensor A = chol && cols > block_size ? at::empty({rows, cols}, W.options()) : at::Tensor();
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "ext_sweep", [&] {
    sgk::SweepParams<scalar_t> p;
    p.rows = rows;
    p.cols = cols;
    p.W = W.mutable_data_ptr<scalar_t>();
    p.ldw = cols;
    p.G = Gc.const_data_ptr<scalar_t>();
    p.ldg = cols;
    p.factor = factor;
    if (A.defined()) {
      p.A = A.mutable_data_ptr<scalar_t>();
      p.lda = cols;
    }
    p.sparsity = sparsity;
    p.n = n;
    p.m = m;
    p.block_size = block_size;
    if (sc.defined()) {
      p.scale = sc.const_data_ptr<scalar_t>();
      p.zero = zc.const_data_ptr<scalar_t>();
      p.ldq = sc.size(1);
      p.group_size = group_size;
      p.maxq = maxq;
    }
    auto parallel = [](int64_t ntasks, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
      at::parallel_for(0, ntasks, grain, fn);
    };
    // C (m, n) = beta * C + op(A) @ B on row-major buffers, through ATen's BLAS (no copies: strided views)
    auto gemm = [&](int64_t mm, int64_t nn, int64_t kk, const scalar_t* a, int64_t lda, bool a_trans,
                    const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc, int beta) {
      const at::TensorOptions o = W.options();
      const at::Tensor At = a_trans ? at::from_blob(const_cast<scalar_t*>(a), {kk, mm}, {lda, 1}, o).t()
                                    : at::from_blob(const_cast<scalar_t*>(a), {mm, kk}, {lda, 1}, o);
      const at::Tensor Bt = at::from_blob(const_cast<scalar_t*>(b), {kk, nn}, {ldb, 1}, o);
      at::Tensor Ct = at::from_blob(c, {mm, nn}, {ldc, 1}, o);
      Ct.addmm_(At, Bt, /*beta=*/beta, /*alpha=*/1);
    };
    loss = sgk::sweep(p, parallel, gemm);
  });
  return at::scalar_tensor(loss, W.options());
}

at::Tensor sweep_cpu(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                     int64_t block_size, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  return sweep_cpu_impl(W, U, sparsity, n, m, block_size, scale, zero, maxq, group_size, sgk::Factor::kInverse,
                        "ext_sweep");
}

at::Tensor sweep_cholesky_cpu(const at::Tensor& W, const at::Tensor& R, double sparsity, int64_t n, int64_t m,
                              int64_t block_size, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  return sweep_cpu_impl(W, R, sparsity, n, m, block_size, scale, zero, maxq, group_size, sgk::Factor::kCholesky,
                        "ext_sweep_cholesky");
}

// ---- shape-only implementations ----
std::tuple<at::Tensor, at::Tensor> inverse_factor_meta(const at::Tensor& H, double damp) {
  sgk_aten::check_factor_args(H, damp, "ext_inverse_factor");
  return {at::empty_like(H, at::MemoryFormat::Contiguous), at::empty({}, H.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> cholesky_factor_meta(const at::Tensor& H, double damp) {
  sgk_aten::check_factor_args(H, damp, "ext_cholesky_factor");
  return {at::empty_like(H, at::MemoryFormat::Contiguous), at::empty({}, H.options().dtype(at::kInt))};
}

at::Tensor nm_keep_mask_meta(const at::Tensor& scores, int64_t n, int64_t m) {
  sgk_aten::check_nm_args(scores, n, m);
  return at::empty(scores.sizes(), scores.options().dtype(at::kBool));
}

at::Tensor sweep_meta(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                      int64_t block_size, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  sgk_aten::check_sweep_args(W, U, sparsity, n, m, block_size, scale, zero, maxq, group_size);
  return at::empty({}, W.options());
}

}  // namespace

// A fragment: other parts of the package define further operators in the same namespace from Python.
TORCH_LIBRARY_FRAGMENT(sparsegpt_kernels, m) {
  m.def("ext_inverse_factor(Tensor H, float damp) -> (Tensor, Tensor)");
  m.def("ext_nm_keep_mask(Tensor scores, int n, int m) -> Tensor");
  m.def(
      "ext_sweep(Tensor(a!) W, Tensor U, float sparsity, int n, int m, int block_size, Tensor? scale, "
      "Tensor? zero, int maxq, int group_size) -> Tensor");
  m.def("ext_cholesky_factor(Tensor H, float damp) -> (Tensor, Tensor)");
  m.def(
      "ext_sweep_cholesky(Tensor(a!) W, Tensor R, float sparsity, int n, int m, int block_size, Tensor? scale, "
      "Tensor? zero, int maxq, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsegpt_kernels, CPU, m) {
  m.impl("ext_inverse_factor", &sgk_aten::inverse_factor);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_cpu);
  m.impl("ext_sweep", &sweep_cpu);
  m.impl("ext_cholesky_factor", &cholesky_factor_cpu);
  m.impl("ext_sweep_cholesky", &sweep_cholesky_cpu);
}

TORCH_LIBRARY_IMPL(sparsegpt_kernels, Meta, m) {
  m.impl("ext_inverse_factor", &inverse_factor_meta);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_meta);
  m.impl("ext_sweep", &sweep_meta);
  m.impl("ext_cholesky_factor", &cholesky_factor_meta);
  m.impl("ext_sweep_cholesky", &sweep_meta);
}
