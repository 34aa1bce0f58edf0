// CUDA implementations of the sparsegpt_kernels::ext_* operators: the block driver around the torch-free kernels of
// sweep_kernels.cu (mask selection for unstructured blocks and the lazy GEMM through ATen/cuBLAS), N:M selection, and
// the inverse factor on ATen's cuSOLVER-backed linalg (csrc/aten/aten_ops.cpp, device-generic).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../core/rules.h"
#include "../aten/aten_ops.h"
#include "sweep_kernels.h"

namespace {

// (rows, B) uint8 mask (1 = pruned) of exactly the k lowest scores, ties in row-major order (reference semantics);
// computed on the device without synchronizing. The threshold is the k-th value of a full sort: ATen's kthvalue gives
// a 1-D tensor to a single thread block, which made this mask most of the unstructured sweep's time on the H200
// (0.24 s for an 11008x4096 layer, against 0.03 s for 2:4); the sort runs on the whole GPU.
at::Tensor unstructured_mask(const at::Tensor& scores, int64_t k) {
  const at::Tensor flat = scores.reshape({-1});
  if (k <= 0) return at::zeros(scores.sizes(), scores.options().dtype(at::kByte));
  if (k >= flat.numel()) return at::ones(scores.sizes(), scores.options().dtype(at::kByte));
  const at::Tensor thresh = std::get<0>(at::sort(flat)).select(0, k - 1);
  const at::Tensor below = flat.lt(thresh);
  const at::Tensor tied = flat.eq(thresh);
  const at::Tensor need = below.sum().neg().add(k);
  const at::Tensor take = tied.logical_and(tied.cumsum(0).le(need));
  return below.logical_or(take).to(at::kByte).reshape(scores.sizes()).contiguous();
}

at::Tensor nm_keep_mask_cuda(const at::Tensor& scores, int64_t n, int64_t m) {
  sgk_aten::check_nm_args(scores, n, m);
  TORCH_CHECK(scores.is_cuda(), "ext_nm_keep_mask (CUDA): scores must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  at::Tensor keep = at::empty(s.sizes(), s.options().dtype(at::kBool));
  const int64_t cols = s.size(-1);
  const int64_t rows = cols ? s.numel() / cols : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "ext_nm_keep_mask", [&] {
    C10_CUDA_CHECK(sgk_cuda::launch_nm_keep_mask<scalar_t>(s.const_data_ptr<scalar_t>(), rows, cols,
                                                           static_cast<int>(n), static_cast<int>(m),
                                                           reinterpret_cast<uint8_t*>(keep.data_ptr()), stream));
  });
  return keep;
}

at::Tensor sweep_cuda(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                      int64_t block_size, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size) {
  sgk_aten::check_sweep_args(W, U, sparsity, n, m, block_size, scale, zero, maxq, group_size, "ext_sweep");
  TORCH_CHECK(W.is_cuda(), "ext_sweep (CUDA): W must be a CUDA tensor");
  TORCH_CHECK(std::min(block_size, W.size(1)) <= sgk::kCudaMaxBlock, "ext_sweep (CUDA): block_size must be <= ",
              sgk::kCudaMaxBlock, ", got ", block_size);
  const c10::cuda::CUDAGuard guard(W.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = W.size(0), cols = W.size(1);
  at::Tensor row_loss = at::zeros({rows}, W.options());
  if (rows == 0 || cols == 0) return row_loss.sum();
  const at::Tensor Uc = U.contiguous();
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor zc = zero.has_value() ? zero->contiguous() : at::Tensor();
  const at::Tensor d = Uc.diagonal();
  const int64_t Bmax = std::min(block_size, cols);
  at::Tensor E_buf = at::empty({rows * Bmax}, W.options());
  for (int64_t i1 = 0; i1 < cols; i1 += Bmax) {
    const int64_t i2 = std::min(i1 + Bmax, cols);
    const int64_t B = i2 - i1;
    at::Tensor mask;
    if (m == 0) {
      const at::Tensor W1 = W.slice(1, i1, i2);
      const at::Tensor d1 = d.slice(0, i1, i2);
      mask = unstructured_mask(W1.mul(W1).div(d1.mul(d1)), sgk::n_pruned(sparsity, rows * B));
    }
    at::Tensor E = E_buf.narrow(0, 0, rows * B).view({rows, B});
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "ext_sweep", [&] {
      sgk_cuda::BlockArgs<scalar_t> a{};
      a.W = W.mutable_data_ptr<scalar_t>();
      a.ldw = cols;
      a.U = Uc.const_data_ptr<scalar_t>();
      a.ldu = cols;
      a.rows = rows;
      a.i1 = i1;
      a.i2 = i2;
      a.pruned = m == 0 ? reinterpret_cast<const uint8_t*>(mask.const_data_ptr()) : nullptr;
      a.n = static_cast<int>(n);
      a.m = static_cast<int>(m);
      a.scale = sc.defined() ? sc.const_data_ptr<scalar_t>() : nullptr;
      a.zero = zc.defined() ? zc.const_data_ptr<scalar_t>() : nullptr;
      a.ldq = sc.defined() ? sc.size(1) : 0;
      a.group_size = sc.defined() ? group_size : 1;
      a.maxq = static_cast<int>(maxq);
      a.E = E.mutable_data_ptr<scalar_t>();
      a.row_loss = row_loss.mutable_data_ptr<scalar_t>();
      C10_CUDA_CHECK(sgk_cuda::launch_sweep_block<scalar_t>(a, stream));
    });
    if (i2 < cols) {
      W.slice(1, i2).addmm_(E, Uc.slice(0, i1, i2).slice(1, i2), /*beta=*/1, /*alpha=*/-1);
    }
  }
  return row_loss.sum().div_(2);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsegpt_kernels, CUDA, m) {
  m.impl("ext_inverse_factor", &sgk_aten::inverse_factor);
  m.impl("ext_nm_keep_mask", &nm_keep_mask_cuda);
  m.impl("ext_sweep", &sweep_cuda);
}
