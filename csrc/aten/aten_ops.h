// ATen-level pieces shared by the CPU and CUDA registrations of the sparsegpt_kernels::ext_* operators. Device-generic
// (any device ATen's linalg supports): csrc/cpu/ops.cpp and csrc/cuda/register_cuda.cpp both use them. The value rules
// of the checks (damping, sparsity, N:M, quantization levels) are those of csrc/core/rules.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace sgk_aten {

// Shape/dtype/damping checks of ext_inverse_factor and ext_cholesky_factor (`name` appears in the message).
void check_factor_args(const at::Tensor& H, double damp, const char* name);

// Upper Cholesky factor U of (H + damping)^-1 with the reversal identity (one Cholesky, one triangular inverse).
// Returns (U, info): info == 0 on success, > 0 for a non-positive pivot, -1 for a non-finite U or a non-positive
// diagonal. Works on any device ATen's linalg supports; does not modify H and does not synchronize.
std::tuple<at::Tensor, at::Tensor> inverse_factor(const at::Tensor& H, double damp);

// Inverse of an upper triangular matrix, recursively blocked (triangular products as recursive GEMMs): ~c³/3 FLOPs.
at::Tensor upper_triangular_inverse(const at::Tensor& R);

// Shared argument checks of ext_sweep and ext_sweep_cholesky (everything that can be checked before W is touched;
// `name`, the operator, appears in the message).
void check_sweep_args(const at::Tensor& W, const at::Tensor& U, double sparsity, int64_t n, int64_t m,
                      int64_t block_size, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& zero, int64_t maxq, int64_t group_size, const char* name);

// Argument checks of ext_nm_keep_mask.
void check_nm_args(const at::Tensor& scores, int64_t n, int64_t m);
// ext_unstructured_keep_mask's arguments: 2-D float32/float64 scores, sparsity in [0, 1), block_size >= 1.
void check_unstructured_mask_args(const at::Tensor& scores, double sparsity, int64_t block_size);

}  // namespace sgk_aten
