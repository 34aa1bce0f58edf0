// The sparsegpt_kernels::ext_* operators: schemas, CPU implementations (on the torch-free core in csrc/core) and
// shape-only Meta implementations (used by FakeTensor / torch.compile / opcheck).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>

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

at::Tensor sweep_cpu(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                     int64_t block_size, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  sgk_aten::check_sweep_args(W, U, sparsity, n, m, block_size, scale, zero, maxq, group_size);
  TORCH_CHECK(W.device().is_cpu(), "ext_sweep (CPU): W must be a CPU tensor");
  const at::Tensor Uc = U.contiguous();
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor zc = zero.has_value() ? zero->contiguous() : at::Tensor();
  const int64_t rows = W.size(0), cols = W.size(1);
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "ext_sweep", [&] {
    sgk::SweepParams<scalar_t> p;
    p.rows = rows;
    p.cols = cols;
    p.W = W.mutable_data_ptr<scalar_t>();
    p.ldw = cols;
    p.U = Uc.const_data_ptr<scalar_t>();
    p.ldu = cols;
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
    auto gemm = [&](int64_t i1, int64_t i2, const scalar_t* E) {
      const at::Tensor Et = at::from_blob(const_cast<scalar_t*>(E), {rows, i2 - i1}, W.options());
      W.slice(1, i2).addmm_(Et, Uc.slice(0, i1, i2).slice(1, i2), /*beta=*/1, /*alpha=*/-1);
    };
    loss = sgk::sweep(p, parallel, gemm);
  });
  return at::scalar_tensor(loss, W.options());
}

// ---- shape-only implementations ----
std::tuple<at::Tensor, at::Tensor> inverse_factor_meta(const at::Tensor& H, double damp) {
  TORCH_CHECK(H.dim() == 2 && H.size(0) == H.size(1), "ext_inverse_factor: H must be square, got ", H.sizes());
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
}

TORCH_LIBRARY_IMPL(sparsegpt_kernels, CPU, m) {
  m.impl("ext_inverse_factor", &sgk_aten::inverse_factor);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_cpu);
  m.impl("ext_sweep", &sweep_cpu);
}

TORCH_LIBRARY_IMPL(sparsegpt_kernels, Meta, m) {
  m.impl("ext_inverse_factor", &inverse_factor_meta);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_meta);
  m.impl("ext_sweep", &sweep_meta);
}
